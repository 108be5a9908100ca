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
- llama.cpp keeps the previous prompt's KV cache: a new prompt that starts the same way (the next
  turn of a chat) only evaluates what is new.
- All of it runs on the engine's one model thread (``stream_to``).

``llama_cpp`` is imported inside functions only.
"""

from __future__ import annotations

import codecs
import importlib.util
import logging
import os
from typing import Any, Callable, Iterator

from pydantic import BaseModel, ConfigDict, Field

from engine.errors import ModelLoadError
from engine.hookspecs import hookimpl
from engine.load_failures import load_failure
from engine.loader_api import Assessment, Availability, CancelToken, LoadedModelInfo, MemoryEstimate, StreamPiece
from engine.model_folder import ModelFolder, gguf_models, missing_parts
from engine.sampling import SamplingParams, prompt_budget

log = logging.getLogger(__name__)

LOADER_NAME = "llama.cpp"
# The engine's sampling fields llama.cpp honours. Its penalties look at the last 64 tokens
# (prompt included) rather than the whole reply; no_repeat_ngram_size has no llama.cpp counterpart.
SUPPORTED = frozenset({
    "temperature", "top_p", "top_k", "min_p", "typical_p", "repetition_penalty", "presence_penalty",
    "frequency_penalty", "max_new_tokens", "seed", "ban_eos", "skip_special_tokens", "truncation_length",
})
PREFILL_CHUNK = 512  # prompt tokens evaluated between two looks at Stop
KV_SHARE_OF_FREE_MEMORY = 0.5  # the default context is capped so its KV cache takes at most this much
MIN_CONTEXT = 512


class LlamaCppOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n_ctx: int = Field(0, ge=0, le=1_048_576, description=(
        "Context length in tokens; 0 = the model's own, capped so the KV cache fits in half the free memory."))
    n_threads: int = Field(0, ge=0, le=512, description="CPU threads; 0 = the physical cores.")
    n_batch: int = Field(512, ge=1, le=65_536, description="Prompt tokens evaluated per batch.")
    use_mmap: bool = Field(True, description="Memory-map the file (shared with the page cache, loads at once).")
    use_mlock: bool = Field(False, description="Lock the weights in RAM so they are never swapped out.")
    n_gpu_layers: int = Field(-1, ge=-1, le=100_000, description=(
        "Layers on the GPU; -1 = all when this build has a GPU backend, else 0."))
    flash_attn: bool = Field(True, description="Flash attention (used where the build supports it).")
    gguf_file: str | None = Field(None, description="Which model to load when the folder holds several.")


class LlamaCppLoader:
    name = LOADER_NAME
    Options = LlamaCppOptions

    def availability(self) -> Availability:
        if importlib.util.find_spec("llama_cpp") is None:
            return Availability(False, "llama-cpp-python is not installed")
        from importlib.metadata import version

        return Availability(True, f"llama-cpp-python {version('llama_cpp_python')}")

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
        n_ctx, _ = _context_length(options.n_ctx, folder.context_length, folder.kv_bytes_per_token)
        per_token = folder.kv_bytes_per_token
        return MemoryEstimate(sum(sizes.get(p, 0) for p in model_file.parts),
                              per_token * n_ctx if per_token else None, n_ctx)

    def load(self, folder: ModelFolder, options: BaseModel) -> "LlamaCppModel":
        assert isinstance(options, LlamaCppOptions)
        verdict = self.assess(folder)
        if not verdict.can_load:
            raise ModelLoadError(verdict.reason)
        model_file = _pick_model(folder, options.gguf_file)
        path = folder.path / model_file.first
        n_ctx, cap = _context_length(options.n_ctx, folder.context_length, folder.kv_bytes_per_token)
        gpu_layers = _gpu_layers(options.n_gpu_layers)
        threads = options.n_threads or _physical_cores()
        from llama_cpp import Llama

        try:
            llm = Llama(
                model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                n_batch=min(options.n_batch, n_ctx), use_mmap=options.use_mmap, use_mlock=options.use_mlock,
                n_gpu_layers=gpu_layers, flash_attn=options.flash_attn, verbose=False,
            )
        except Exception as error:  # noqa: BLE001 - llama-cpp-python also compiles the GGUF's chat template (Jinja)
            what = "its chat template does not compile" if type(error).__module__.startswith("jinja2") else "llama.cpp could not load it"
            raise ModelLoadError(f"{model_file.first}: {what}: {load_failure(error, [model_file.first])}") from None
        details = f"{model_file.describe()}, {threads} threads, context {n_ctx}"
        if cap:
            details += f" ({cap})"
        info = LoadedModelInfo(name=folder.name, loader=self.name, device="cuda" if gpu_layers else "cpu",
                               dtype=(folder.quantization.gguf_type if folder.quantization else None) or "gguf",
                               context_length=n_ctx, details=details)
        return LlamaCppModel(llm, info)


class LlamaCppModel:
    supported_params = SUPPORTED

    def __init__(self, llm: Any, info: LoadedModelInfo) -> None:
        self._llm = llm
        self.info = info
        self.prompt_tokens_evaluated = 0  # of the last prompt: what the prefix cache did not cover
        model = llm._model
        self._eos = llm.token_eos()
        self._add_bos = bool(model.add_bos_token()) and llm.token_bos() >= 0
        self._bos_text = model.token_get_text(llm.token_bos()) if llm.token_bos() >= 0 else ""
        template = llm.metadata.get("tokenizer.chat_template")
        self.chat_template = template if isinstance(template, str) and template.strip() else None
        special = {"bos_token": self._bos_text, "eos_token": model.token_get_text(self._eos) if self._eos >= 0 else ""}
        self.special_tokens = {name: text for name, text in special.items() if text}

    # -- tokens --------------------------------------------------------------------------------

    def encode(self, prompt: str) -> list[int]:
        """Token ids of a prompt, special tokens parsed; BOS added when the model wants one and it is missing."""
        add_bos = self._add_bos and not (self._bos_text and prompt.startswith(self._bos_text))
        return self._llm.tokenize(prompt.encode("utf-8"), add_bos=add_bos, special=True)

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text))

    # -- generation ----------------------------------------------------------------------------

    def stream(self, prompt: str, params: SamplingParams, cancel: CancelToken, *, seed: int) -> Iterator[StreamPiece]:
        pieces: list[StreamPiece] = []
        for _ in self._generate(prompt, params, cancel, seed, pieces.append):
            yield from pieces
            pieces.clear()
        yield from pieces

    def stream_to(
        self, prompt: str, params: SamplingParams, cancel: CancelToken, *, seed: int, emit: Callable[[StreamPiece], None]
    ) -> None:
        for _ in self._generate(prompt, params, cancel, seed, emit):
            pass

    def _generate(
        self, prompt: str, params: SamplingParams, cancel: CancelToken, seed: int, emit: Callable[[StreamPiece], None]
    ) -> Iterator[None]:
        """Generate, handing pieces to ``emit``; yields after each token so ``stream`` can pass them on."""
        tokens = self.encode(prompt)
        budget = prompt_budget(params, self.info.context_length)
        if budget is not None and len(tokens) > budget:
            tokens = tokens[-budget:]  # the engine tells the user; the oldest text goes first
        room = (self.info.context_length or 0) - len(tokens)
        max_new = min(params.max_new_tokens, room) if self.info.context_length else params.max_new_tokens
        if max_new <= 0 or not tokens:
            return
        self._prefill(tokens, cancel)
        if cancel.cancelled:
            return
        import llama_cpp

        llm = self._llm
        vocab = llm._model.vocab
        llm.set_seed(seed)
        processors = _ban(self._eos) if params.ban_eos and self._eos >= 0 else None
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        special = not params.skip_special_tokens
        previous = list(tokens)
        generated = pending = 0
        for token in llm.generate(
            list(tokens), reset=True, temp=0.0 if params.greedy else params.temperature,
            top_k=params.top_k, top_p=params.top_p, min_p=params.min_p, typical_p=params.typical_p,
            repeat_penalty=params.repetition_penalty, presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty, logits_processor=processors,
        ):
            if llama_cpp.llama_vocab_is_eog(vocab, token) and not params.ban_eos:
                break
            generated += 1
            pending += 1
            text = decoder.decode(llm.detokenize([token], prev_tokens=previous, special=special))
            previous.append(token)
            if text:  # a token that ends inside a character waits for the next one
                emit(StreamPiece(text, pending))
                pending = 0
            yield
            if cancel.cancelled or generated >= max_new:
                break
        if pending:  # a character cut off by max_new_tokens or Stop is dropped, not shown as "�"
            emit(StreamPiece("", pending))

    def _prefill(self, tokens: list[int], cancel: CancelToken) -> None:
        """Evaluate a long prompt chunk by chunk (Stop is checked between chunks), reusing the cached prefix.

        ``generate`` then finds the whole prompt cached and only samples. What had to be evaluated
        is kept in ``prompt_tokens_evaluated`` (the benchmark and tests read it).
        """
        llm = self._llm
        cached = _common_prefix(list(llm._input_ids[: llm.n_tokens]), tokens)
        if cached == len(tokens):
            cached -= 1  # the last prompt token is evaluated again so that there are logits to sample from
        self.prompt_tokens_evaluated = len(tokens) - cached
        llm.n_tokens = cached  # eval drops the cache past this point
        for start in range(cached, len(tokens), PREFILL_CHUNK):
            if cancel.cancelled:
                return
            llm.eval(tokens[start : start + PREFILL_CHUNK])

    def unload(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.close()


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _ban(token: int) -> Any:
    import numpy as np

    def ban(input_ids: Any, scores: Any) -> Any:
        scores[token] = -np.inf
        return scores

    return [ban]


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


def _context_length(requested: int, model_context: int | None, per_token: int | None) -> tuple[int, str]:
    """The context to use, and why it is smaller than the model's (empty when it is not)."""
    if requested:
        return requested, ""
    full = model_context or 4096
    if per_token is None:
        return full, ""
    import psutil

    fits = int(psutil.virtual_memory().available * KV_SHARE_OF_FREE_MEMORY // per_token)
    if fits >= full:
        return full, ""
    capped = max(MIN_CONTEXT, fits // 256 * 256)
    return capped, f"capped from {full}: the KV cache must fit in free memory"


def _gpu_layers(requested: int) -> int:
    import llama_cpp

    offload = bool(llama_cpp.llama_supports_gpu_offload())
    if requested == -1:
        return -1 if offload else 0  # llama.cpp: -1 = every layer
    if requested and not offload:
        raise ModelLoadError("n_gpu_layers was set, but this llama.cpp build has no GPU backend")
    return requested


def _physical_cores() -> int:
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def _llama_cpp_architectures() -> frozenset[str]:
    """Architectures llama.cpp knows: the gguf package's list, kept in step with llama.cpp."""
    from gguf import MODEL_ARCH_NAMES

    return frozenset(MODEL_ARCH_NAMES.values())


@hookimpl
def register_loaders(register: Callable[[Any], None]) -> None:
    register(LlamaCppLoader())
