"""The ExLlamaV2 loader: 4-bit GPTQ on CUDA with exllamav2's fast kernels, fp16.

exllamav2 raises on import without CUDA, so availability is detected without importing it
(``find_spec`` plus ``torch.cuda.is_available()``). It reads only a top-level ``rope_theta``
from config.json; configs written by newer transformers keep it in ``rope_parameters`` alone,
so for those a derived config (under Loadstar's data folder) carries it at the top level too.
"""

from __future__ import annotations

import importlib.util
import json
import threading
from collections.abc import Callable, Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from loadstar import (
    ALL_PARAMS,
    Assessment,
    Availability,
    CancelToken,
    LoadedModelInfo,
    ModelFolder,
    ModelLoadError,
    OutputSpec,
    SamplingParams,
    StreamPiece,
    hookimpl,
    load_error,
)
from loadstar.loaders.derived_folder import derived_folder
from loadstar.loaders.tokenizer_facts import TokenizerPrompts

# Architectures exllamav2 0.3.2 knows (exllamav2/architecture.py); others it would load as Llama.
SUPPORTED_ARCHITECTURES = frozenset({
    "LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM", "YiForCausalLM", "OrionForCausalLM",
    "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM",
    "Starcoder2ForCausalLM", "CohereForCausalLM", "Cohere2ForCausalLM", "DbrxForCausalLM", "Phi3ForCausalLM",
    "GPTBigCodeForCausalLM", "GPT2LMHeadModel", "MiniCPMForCausalLM", "InternLM2ForCausalLM",
    "IndexForCausalLM", "GraniteForCausalLM", "Glm4ForCausalLM",
})


class ExLlamaV2Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_seq_len: int | None = Field(None, ge=256, le=1_048_576, title='Context size (tokens)', description="KV cache length; default: the model's context length.")
    cache: Literal["fp16", "q8", "q4"] = Field("fp16", title='KV cache precision', description="KV cache precision (q4/q8 save VRAM).")
    scratch_dir: Path | None = Field(None, title='Folder for derived files', description="Where derived files go (set by Loadstar to its data folder).")


def rope_fix(config: dict[str, Any]) -> dict[str, Any] | None:
    """A copy of ``config`` with ``rope_theta`` at the top level, or None when none is needed."""
    if "rope_theta" in config:
        return None
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and isinstance(rope.get("rope_theta"), (int, float)):
        return {**config, "rope_theta": rope["rope_theta"]}
    return None


class ExLlamaV2Loader:
    name = "ExLlamaV2"
    Options = ExLlamaV2Options

    def __init__(
        self,
        *,
        has_package: Callable[[], bool] | None = None,
        has_cuda: Callable[[], bool] | None = None,
    ) -> None:
        """The probes are injectable so the choice logic can be tested with CUDA present or absent."""
        self._has_package = has_package or (lambda: importlib.util.find_spec("exllamav2") is not None)
        self._has_cuda = has_cuda or _cuda_available

    def availability(self) -> Availability:
        if not self._has_package():
            return Availability(False, "exllamav2 is not installed")
        if not self._has_cuda():
            return Availability(False, "no CUDA device")
        return Availability(True, f"exllamav2 {_version('exllamav2')}, CUDA")

    def assess(self, folder: ModelFolder) -> Assessment:
        gptq = folder.gptq
        if gptq is None:
            return Assessment(False, "not a GPTQ model")
        if folder.load_blocker:
            return Assessment(False, folder.load_blocker)
        if gptq.bits != 4:
            return Assessment(False, f"{gptq.bits}-bit: ExLlamaV2 runs 4-bit GPTQ only")
        if "safetensors" not in folder.formats:
            return Assessment(False, "needs .safetensors weights")
        if folder.architecture not in SUPPORTED_ARCHITECTURES:
            return Assessment(False, f"architecture {folder.architecture or 'unknown'} is not supported by exllamav2")
        return Assessment(True, f"{gptq.describe()}, fp16 CUDA kernels", 100)

    def load(self, folder: ModelFolder, options: BaseModel) -> ExLlamaV2Model:
        assert isinstance(options, ExLlamaV2Options)
        path = folder.path
        config = json.loads((folder.path / "config.json").read_text())
        fixed = rope_fix(config)
        if fixed is not None:
            if options.scratch_dir is None:
                raise ModelLoadError(f"{folder.name} needs a derived config.json but no scratch folder is set")
            path = derived_folder(folder.path, options.scratch_dir / "exllamav2", {"config.json": json.dumps(fixed).encode()})
        try:
            from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Cache_Q4, ExLlamaV2Cache_Q8, ExLlamaV2Config
            from exllamav2.generator import ExLlamaV2DynamicGenerator
            from transformers import AutoTokenizer

            ex_config = ExLlamaV2Config(str(path))
            if options.max_seq_len:
                ex_config.max_seq_len = options.max_seq_len
            model = ExLlamaV2(ex_config)
            cache_class = {"fp16": ExLlamaV2Cache, "q8": ExLlamaV2Cache_Q8, "q4": ExLlamaV2Cache_Q4}[options.cache]
            cache = cache_class(model, lazy=True)
            model.load_autosplit(cache)
            from exllamav2 import ExLlamaV2Tokenizer

            ex_tokenizer = ExLlamaV2Tokenizer(ex_config)
            generator = ExLlamaV2DynamicGenerator(model=model, cache=cache, tokenizer=ex_tokenizer)
            hf_tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        except Exception as error:
            weights = [w.path for w in folder.files_of("safetensors")]
            raise load_error(self.name, folder.name, error, weights, folder.path) from None
        info = LoadedModelInfo(
            name=folder.name, loader=self.name, device="cuda", dtype="float16",
            context_length=ex_config.max_seq_len, details=folder.gptq.describe() if folder.gptq else "",
        )
        return ExLlamaV2Model(info, model, cache, generator, hf_tokenizer, ex_tokenizer)


class ExLlamaV2Model(TokenizerPrompts):
    supported_params = ALL_PARAMS - {"no_repeat_ngram_size"}

    def __init__(
        self, info: LoadedModelInfo, model: Any, cache: Any, generator: Any, tokenizer: Any, ex_tokenizer: Any
    ) -> None:
        self.info = info
        self._ex_tokenizer = ex_tokenizer
        self._model = model
        self._cache = cache
        self._generator = generator
        self.tokenizer = tokenizer
        self._lock = threading.Lock()

    def stream(
        self, prompt: str, params: SamplingParams, cancel: CancelToken, *, seed: int, output: OutputSpec | None = None,
    ) -> Iterator[StreamPiece]:  # ``output`` comes only to a model whose info.features name it: none here
        import torch
        from exllamav2.generator import ExLlamaV2DynamicJob, ExLlamaV2Sampler

        settings = ExLlamaV2Sampler.Settings()
        if params.greedy:
            settings.greedy()
        else:
            settings.temperature = params.temperature
            settings.top_p = params.top_p
            settings.top_k = params.top_k
            settings.min_p = params.min_p
            settings.typical = params.typical_p if params.typical_p < 1.0 else 0.0
        settings.token_repetition_penalty = params.repetition_penalty
        settings.token_presence_penalty = params.presence_penalty
        settings.token_frequency_penalty = params.frequency_penalty
        eos = self.tokenizer.eos_token_id
        if params.ban_eos and eos is not None:
            settings.disallow_tokens(self._ex_tokenizer, [eos])
        ids = self.fit_prompt(self.encode(prompt), params)
        job = ExLlamaV2DynamicJob(
            input_ids=torch.tensor([ids]),
            max_new_tokens=params.max_new_tokens,
            gen_settings=settings,
            seed=seed,
            decode_special_tokens=not params.skip_special_tokens,
            stop_conditions=[eos] if eos is not None and not params.ban_eos else [],
        )
        with self._lock:
            self._generator.enqueue(job)
            try:
                while self._generator.num_remaining_jobs():
                    if cancel.cancelled:
                        self._generator.cancel(job)
                        return
                    for result in self._generator.iterate():
                        if result.get("stage") != "streaming":
                            continue
                        ids = result.get("token_ids")
                        tokens = int(ids.shape[-1]) if ids is not None else 0
                        text = result.get("text", "")
                        if text or tokens:
                            yield StreamPiece(text, tokens)
            finally:
                if self._generator.num_remaining_jobs():
                    self._generator.cancel(job)

    def unload(self) -> None:
        import torch

        if self._model is not None:
            self._model.unload()
        self._model = self._cache = self._generator = None
        torch.cuda.empty_cache()


@hookimpl
def register_loaders(register) -> None:
    register(ExLlamaV2Loader())


def _cuda_available() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def _version(package: str) -> str:
    try:
        return version(package)
    except Exception:
        return "unknown version"
