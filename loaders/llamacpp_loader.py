"""The llama.cpp loader: GGUF files run by llama.cpp itself (llama-cpp-python), quantized as they are.

Transformers dequantizes a GGUF to float32 on load (3x slower, 6x the file in RAM); llama.cpp
memory-maps the file and computes on the quantized weights. This loader is preferred for GGUF;
Transformers stays the fallback and is still offered with its reason.

- Folders: any ``.gguf`` whose architecture llama.cpp knows (read from the GGUF header); split
  files (``name-00001-of-00003.gguf``) are one model, loaded from their first part; a folder with
  several models loads the one named in the ``gguf_file`` option (else the first, and says so).
- The engine renders every prompt (the GGUF's own chat template, in the same bounded sandbox);
  this loader counts tokens with llama.cpp's tokenizer and generates token by token, with Stop
  checked between tokens and between chunks of a long prompt.
- Continuous batching (``max_batch`` sequences in one context, loaders/llamacpp_batch.py): the
  engine decodes several requests together; one alone is a batch of one, so both give the same tokens.
- Each sequence slot keeps its prompt's KV cache: a new prompt that starts the same way (the next
  turn of a chat) only evaluates what is new.
- All of it runs on the model's engine core thread (engine/models/core.py).

``llama_cpp`` is imported inside functions only.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from loadstar import (
    FEATURE_EMBEDDINGS,
    FEATURE_GRAMMAR,
    FEATURE_LOGPROBS,
    Assessment,
    Availability,
    BadRequestError,
    CancelToken,
    GGUFModelFile,
    LoadedModel,
    LoadedModelInfo,
    MemoryEstimate,
    ModelFolder,
    ModelLoadError,
    OutputSpec,
    SamplingParams,
    StreamPiece,
    TextEmbedding,
    format_size,
    gguf_models,
    hookimpl,
    load_failure,
    missing_parts,
)
from loadstar.loaders.llamacpp_native import NativeLlama
from loadstar.loaders.llamacpp_smoke import SmokeResult, check_build

if TYPE_CHECKING:
    from loadstar.loaders.llamacpp_batch import LlamaCppBatch

log = logging.getLogger(__name__)

LOADER_NAME = "llama.cpp"
# The engine's sampling fields llama.cpp honours. Its penalties look at the last 64 tokens
# (prompt included) rather than the whole reply; no_repeat_ngram_size has no llama.cpp counterpart.
SUPPORTED = frozenset({
    "temperature", "top_p", "top_k", "min_p", "typical_p", "repetition_penalty", "presence_penalty",
    "frequency_penalty", "max_new_tokens", "seed", "ban_eos", "skip_special_tokens", "truncation_length",
})
ALONE = -1  # the batch key of a request run through ``stream`` (not through the engine's batch)
KV_SHARE_OF_FREE_MEMORY = 0.5  # the default context is capped so the KV caches take at most this much
MIN_CONTEXT = 512
GPU_BACKENDS = ("cuda", "hip", "vulkan", "metal", "sycl", "musa", "cann")  # libggml-<backend> in a GPU build


EMBED_MAX_TOKENS = 512  # tokens per embedded text, read in one pass
MAX_TEMPLATE_BYTES = 1024 * 1024  # real chat templates are a few kB; the largest known is ~30 kB


class LlamaCppOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n_ctx: int = Field(0, ge=0, le=1_048_576, title="Context size (tokens, 0 = the model's own)", description=(
        "Context length in tokens, for each request; 0 = the model's own, capped so the KV caches of "
        "max_batch requests fit in half the free memory."))
    n_threads: int = Field(0, ge=0, le=512, title='CPU threads', description="CPU threads; 0 = the physical cores.")
    n_batch: int = Field(512, ge=1, le=65_536, title='Prompt batch size', description="Prompt tokens evaluated per batch.")
    use_mmap: bool = Field(True, title='Map the file into memory', description="Memory-map the file (shared with the page cache, loads at once).")
    use_mlock: bool = Field(False, title='Lock the weights in RAM', description="Lock the weights in RAM so they are never swapped out.")
    n_gpu_layers: int = Field(-1, ge=-1, le=100_000, title='Layers on the GPU', description=(
        "Layers on the GPU; -1 = all when this build has a GPU backend, else 0."))
    flash_attn: bool = Field(True, title='Flash attention', description="Flash attention (used where the build supports it).")
    gguf_file: str | None = Field(None, title='GGUF file', description="Which model to load when the folder holds several.")
    max_batch: int = Field(4, ge=1, le=64, title='Requests decoded together', description=(
        "Requests decoded together (continuous batching), each with a KV cache of n_ctx tokens; 1 = one at a time."))


class LlamaCppLoader:
    name = LOADER_NAME
    Options = LlamaCppOptions

    def __init__(self) -> None:
        self._build_verdict: SmokeResult | None = None
        self._build_checked = False

    def availability(self) -> Availability:
        if importlib.util.find_spec("llama_cpp") is None:
            return Availability(False, "llama-cpp-python is not installed")
        from importlib.metadata import version

        verdict = self._checked_build()
        if verdict is not None and verdict.faulted:
            return Availability(False, verdict.reason)
        return Availability(True, f"llama-cpp-python {version('llama_cpp_python')}")

    def _checked_build(self) -> SmokeResult | None:
        """The smoke test's verdict on this build, once per loader (a child process, only for a new build)."""
        if not self._build_checked:
            self._build_checked = True
            self._build_verdict = check_build()
            if self._build_verdict is not None and not self._build_verdict.ok:
                log.warning("%s", self._build_verdict.reason)
        return self._build_verdict

    def assess(self, folder: ModelFolder) -> Assessment:
        ggufs = [w.path for w in folder.files_of("gguf")]
        if not ggufs:
            return Assessment(False, "no .gguf file in the folder")
        if folder.load_blocker:
            return Assessment(False, folder.load_blocker)
        arch = folder.architecture or "unknown"
        if arch not in _llama_cpp_architectures():
            return Assessment(False, f"GGUF architecture '{arch}' is not known to llama.cpp")
        models = gguf_models(ggufs)
        incomplete = [m for m in models if missing_parts(m)]
        if incomplete:
            return Assessment(False, f"split GGUF {incomplete[0].first} is missing {', '.join(missing_parts(incomplete[0]))}")
        quant = folder.quantization
        kind = quant.gguf_type if quant and quant.gguf_type else "GGUF"
        which = f"{len(models)} GGUF models, choose one (gguf_file)" if len(models) > 1 else models[0].describe()
        return Assessment(True, f"{which} ({kind}), run quantized by llama.cpp", priority=100)

    def estimate_memory(self, folder: ModelFolder, options: BaseModel) -> MemoryEstimate:
        """The GGUF file as it is (llama.cpp runs it quantized) plus an f16 KV cache for the context."""
        assert isinstance(options, LlamaCppOptions)
        model_file = _pick_model(folder, options.gguf_file)
        sizes = {w.path: w.size for w in folder.weight_files}
        n_ctx, _ = _context_length(options.n_ctx, folder.context_length, folder.kv_bytes_per_token, options.max_batch)
        per_token = folder.kv_bytes_per_token
        return MemoryEstimate(sum(sizes.get(p, 0) for p in model_file.parts),
                              per_token * n_ctx * options.max_batch if per_token else None, n_ctx, options.max_batch,
                              gpu_share=_gpu_share(options.n_gpu_layers, folder.layers))

    def load(self, folder: ModelFolder, options: BaseModel) -> LlamaCppModel:
        assert isinstance(options, LlamaCppOptions)
        verdict = self.assess(folder)
        if not verdict.can_load:
            raise ModelLoadError(verdict.reason)
        model_file = _pick_model(folder, options.gguf_file)
        path = folder.path / model_file.first
        n_ctx, cap = _context_length(options.n_ctx, folder.context_length, folder.kv_bytes_per_token, options.max_batch)
        gpu_layers = _gpu_layers(options.n_gpu_layers)
        threads = options.n_threads or _physical_cores()
        from llama_cpp import Llama

        try:
            llm = Llama(
                model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                n_batch=min(options.n_batch, n_ctx), use_mmap=options.use_mmap, use_mlock=options.use_mlock,
                n_gpu_layers=gpu_layers, flash_attn=options.flash_attn, verbose=False,
            )
        except Exception as error:
            what = "its chat template does not compile" if type(error).__module__.startswith("jinja2") else "llama.cpp could not load it"
            raise ModelLoadError(f"{model_file.first}: {what}: {load_failure(error, [model_file.first])}") from None
        try:
            if options.max_batch > 1:  # llama-cpp-python made a one-sequence context
                NativeLlama(llm).make_context(options.max_batch, n_ctx)
        except Exception as error:
            llm.close()
            raise ModelLoadError(f"{model_file.first}: llama.cpp could not make its context: {load_failure(error, [model_file.first])}") from None
        details = f"{model_file.describe()}, {threads} threads, context {n_ctx}, batch {options.max_batch}"
        if cap:
            details += f" ({cap})"
        info = LoadedModelInfo(name=folder.name, loader=self.name, device="cuda" if gpu_layers else "cpu",
                               dtype=(folder.quantization.gguf_type if folder.quantization else None) or "gguf",
                               context_length=n_ctx, details=details,
                               features=frozenset({FEATURE_GRAMMAR, FEATURE_LOGPROBS, FEATURE_EMBEDDINGS}))
        model = LlamaCppModel(llm, info, options.max_batch)
        own = folder.path / "chat_template.jinja"  # the folder's template wins over the GGUF's, as for Transformers
        if own.is_file():
            if own.stat().st_size > MAX_TEMPLATE_BYTES:  # a repo's file: read only what a template can be
                model.unload()
                raise ModelLoadError(f"chat_template.jinja is larger than {format_size(MAX_TEMPLATE_BYTES)}: "
                                     "not a chat template")
            model.chat_template = own.read_text(encoding="utf-8", errors="replace") or model.chat_template
        return model


class LlamaCppModel(LoadedModel):
    supported_params = SUPPORTED

    def __init__(self, llm: Any, info: LoadedModelInfo, max_batch: int = 1) -> None:
        from loadstar.loaders.llamacpp_batch import LlamaCppBatch

        self.native = NativeLlama(llm)  # llama-cpp-python's internals, for the batch
        self._embedder: Any = None  # the embedding context, made at the first embed()
        self._llm = llm
        self.info = info
        self.max_batch = max_batch
        self._batch = LlamaCppBatch(self, max_batch)
        self.prompt_tokens_evaluated = 0  # of the last prompt: what the prefix cache did not cover
        self._eos = llm.token_eos()
        self._add_bos = self.native.adds_bos() and llm.token_bos() >= 0
        self._bos_text = self.native.token_text(llm.token_bos()) if llm.token_bos() >= 0 else ""
        template = llm.metadata.get("tokenizer.chat_template")
        self.chat_template = template if isinstance(template, str) and template.strip() else None
        special = {"bos_token": self._bos_text, "eos_token": self.native.token_text(self._eos) if self._eos >= 0 else ""}
        self.special_tokens = {name: text for name, text in special.items() if text}

    # -- tokens --------------------------------------------------------------------------------

    def encode(self, prompt: str) -> list[int]:
        """Token ids of a prompt, special tokens parsed; BOS added when the model wants one and it is missing."""
        add_bos = self._add_bos and not (self._bos_text and prompt.startswith(self._bos_text))
        return self._llm.tokenize(prompt.encode("utf-8"), add_bos=add_bos, special=True)

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text))

    # -- generation ----------------------------------------------------------------------------

    def open_batch(self) -> LlamaCppBatch:
        """The model's one batch (its slots own the context's sequences and their cached prefixes)."""
        return self._batch

    def clear_cache(self) -> None:
        """Empty the KV cache, every slot's cached prefix included (benchmarks: after llama.cpp's own
        generate wrote to the context; the next prompt is read in full)."""
        self._batch.clear()

    def stream(
        self, prompt: str, params: SamplingParams, cancel: CancelToken, *, seed: int, output: OutputSpec | None = None
    ) -> Iterator[StreamPiece]:
        """One request alone: a batch of one, so its tokens are those it gets in any batch."""
        batch = self._batch
        batch.add(ALONE, prompt, params, seed=seed, output=output)
        try:
            while not cancel.cancelled:
                step = batch.step().get(ALONE)
                if step is None:
                    continue
                if step.piece is not None:
                    yield step.piece
                if step.done:
                    return
        finally:
            batch.remove(ALONE)

    def stream_to(
        self, prompt: str, params: SamplingParams, cancel: CancelToken, *, seed: int, emit: Callable[[StreamPiece], None],
        output: OutputSpec | None = None,
    ) -> None:
        for piece in self.stream(prompt, params, cancel, seed=seed, output=output):
            emit(piece)

    def embed(self, texts: list[str]) -> list[TextEmbedding]:
        """Each text through a second context on the same weights, in embedding mode (made at the first
        call: the chat's context and its cached prefixes stay as they are)."""
        if self._embedder is None:
            self._embedder = self.native.embedding_context(EMBED_MAX_TOKENS, _physical_cores())
        out = []
        for index, text in enumerate(texts):
            tokens = self._llm.tokenize(text.encode("utf-8"), add_bos=self._add_bos, special=False)
            if len(tokens) > EMBED_MAX_TOKENS:
                raise BadRequestError(f"input {index} is {len(tokens)} tokens long; at most {EMBED_MAX_TOKENS} are embedded")
            if not tokens:
                raise BadRequestError(f"input {index} is empty")
            out.append(TextEmbedding.of(self.native.embed_tokens(self._embedder, tokens), len(tokens)))
        return out

    def unload(self) -> None:
        llm, self._llm = self._llm, None
        if self._embedder is not None:
            self._embedder.close()
            self._embedder = None
        if llm is not None:
            self._batch.free()
            llm.close()


def _pick_model(folder: ModelFolder, requested: str | None) -> GGUFModelFile:
    models = gguf_models([w.path for w in folder.files_of("gguf")])
    if requested is None:
        if len(models) > 1:
            log.info("%s holds %d GGUF models; loading %s (choose another with gguf_file)",
                     folder.name, len(models), models[0].first)
        return models[0]
    for model in models:
        if requested in model.parts:
            return model
    names = ", ".join(m.first for m in models)
    raise ModelLoadError(f"{folder.name} has no GGUF file named {requested} (it has: {names})")


def _context_length(
    requested: int, model_context: int | None, per_token: int | None, sequences: int = 1
) -> tuple[int, str]:
    """The context for each sequence, and why it is smaller than the model's (empty when it is not)."""
    if requested:
        return requested, ""
    full = model_context or 4096
    if per_token is None:
        return full, ""
    import psutil

    fits = int(psutil.virtual_memory().available * KV_SHARE_OF_FREE_MEMORY // (per_token * sequences))
    if fits >= full:
        return full, ""
    capped = max(MIN_CONTEXT, fits // 256 * 256)
    return capped, f"capped from {full}: the KV caches of {sequences} requests must fit in free memory"


def _gpu_share(requested: int, layers: int | None, *, backend: bool | None = None) -> float:
    """The share of the model that ``n_gpu_layers`` puts on the GPU (its layers' weights and KV cache),
    told without importing llama_cpp into the server: 0 when the build has no GPU backend (``backend``:
    whether it has; None: the installed one's, ``gpu_backend_installed``)."""
    if requested == 0 or not (gpu_backend_installed() if backend is None else backend):
        return 0.0
    if requested == -1 or not layers or layers <= 0:
        return 1.0  # every layer (or a count that cannot be weighed: the whole model, to be safe)
    return min(1.0, requested / layers)


def gpu_backend_installed() -> bool:
    """Whether the installed llama-cpp-python was built with a GPU backend (its package holds the
    backend's library: libggml-cuda, -hip, -vulkan, -metal, -sycl), found without importing it."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        return False
    lib = Path(spec.origin).parent / "lib"
    return lib.is_dir() and any(
        f.name.startswith(f"libggml-{backend}") for f in lib.iterdir() for backend in GPU_BACKENDS)


def _gpu_layers(requested: int) -> int:
    import llama_cpp

    offload = bool(llama_cpp.llama_supports_gpu_offload())
    if requested == -1:
        return -1 if offload else 0  # llama.cpp: -1 = every layer
    if requested and not offload:
        raise ModelLoadError("n_gpu_layers was set, but this llama.cpp build has no GPU backend")
    return requested


def _physical_cores() -> int:
    """The physical cores, but never more than the CPUs this process may run on (a container's
    cpuset, taskset): llama.cpp's threads spin at each step's barriers, so one thread more than
    the CPUs it has turns a token's milliseconds into a scheduler's time slices."""
    import psutil

    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    return max(1, min(cores, allowed))


def _llama_cpp_architectures() -> frozenset[str]:
    """Architectures llama.cpp knows: the gguf package's list, kept in step with llama.cpp."""
    from gguf import MODEL_ARCH_NAMES

    return frozenset(MODEL_ARCH_NAMES.values())


@hookimpl
def register_loaders(register: Callable[[Any], None]) -> None:
    register(LlamaCppLoader())
