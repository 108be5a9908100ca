"""Loadstar's public surface: the one import for plugin authors.

Everything a loader or an extension needs comes from here::

    from loadstar import hookimpl, LoadedModel, LoadedModelInfo, StreamPiece

The names below are the contract; the modules behind them (``loadstar.engine.*``) are internal
and may move. Loadstar's own loaders (``loaders/``) and extensions (``extensions/``) import only
from here, as a third-party plugin does. docs/PLUGINS.md documents each hook and type, and a
test checks it against the code.
"""

from loadstar.engine.atomic import read_store, write_atomic
from loadstar.engine.chat.characters import Character
from loadstar.engine.chat.messages import ChatMessage
from loadstar.engine.chat.prompt_formats import PromptFormat
from loadstar.engine.errors import (
    BadRequestError,
    GenerationFailed,
    LoadstarError,
    ModelLoadError,
    first_problem,
    one_line,
    problem_line,
)
from loadstar.engine.generation.requests import GenerationRequest
from loadstar.engine.metrics import MetricsSnapshot
from loadstar.engine.models.default_model import default_model_source
from loadstar.engine.models.folder import (
    GGUFModelFile,
    ModelFolder,
    Quantization,
    format_size,
    gguf_models,
    missing_parts,
    weight_format,
)
from loadstar.engine.models.gptq_dequant import dequantize_layer
from loadstar.engine.models.gptq_tensors import (
    TensorGPTQ,
    filename_hint,
    infer_gptq_from_safetensors,
    read_safetensors_header,
)
from loadstar.engine.models.load_failures import load_error, load_failure
from loadstar.engine.models.loader_api import (
    FEATURE_EMBEDDINGS,
    FEATURE_GRAMMAR,
    FEATURE_LOGPROBS,
    Assessment,
    Availability,
    CancelToken,
    DecodeBatch,
    LoadedModel,
    LoadedModelInfo,
    Loader,
    MemoryEstimate,
    OutputSpec,
    SequenceStep,
    StreamPiece,
    TextEmbedding,
    TokenChoice,
    TokenLogprob,
    pump,
)
from loadstar.engine.plugins.extension_api import PluginContext, ReplyDraft, RequestDraft, UIContribution
from loadstar.engine.plugins.hookspecs import hookimpl
from loadstar.engine.sampling import ALL_PARAMS, SamplingParams, prompt_budget
from loadstar.engine.settings import Settings
from loadstar.engine.tools import Tool

__all__ = [
    # hooks
    "hookimpl",
    # loaders: the contract
    "Loader", "Availability", "Assessment", "MemoryEstimate", "LoadedModel", "LoadedModelInfo",
    "StreamPiece", "CancelToken", "DecodeBatch", "SequenceStep", "OutputSpec", "TokenChoice",
    "TokenLogprob", "FEATURE_GRAMMAR", "FEATURE_LOGPROBS", "FEATURE_EMBEDDINGS", "TextEmbedding", "pump",
    # loaders: what they read
    "ModelFolder", "Quantization", "GGUFModelFile", "gguf_models", "missing_parts", "weight_format",
    "format_size", "TensorGPTQ", "infer_gptq_from_safetensors", "read_safetensors_header", "filename_hint",
    "dequantize_layer", "default_model_source",
    "SamplingParams", "ALL_PARAMS", "prompt_budget",
    # extensions
    "RequestDraft", "ReplyDraft", "UIContribution", "PluginContext", "GenerationRequest", "ChatMessage",
    "PromptFormat", "Settings", "MetricsSnapshot", "Tool", "Character",
    # errors and helpers
    "LoadstarError", "ModelLoadError", "BadRequestError", "GenerationFailed", "one_line", "problem_line",
    "first_problem", "load_failure", "load_error", "write_atomic", "read_store",
]
