"""The contract between the engine and loader plugins.

A loader answers three questions and does one thing:
- ``availability()``: can it run on this machine at all (package installed, CUDA present)?
- ``assess(folder)``: can it load this folder, with what priority, and why (or why not)?
- ``Options``: the typed load options it accepts (unknown fields rejected).
- ``load(folder, options)``: return a ``LoadedModel``.

A ``LoadedModel`` (a base class with the defaults) is the one small interface the engine uses:
its chat template and special tokens (the engine renders prompts), the sampling parameters it
honours, count tokens, stream text for a prompt with a cancel handle, unload. ``pump`` turns a
producer on a helper thread into an iterator (the one place that thread-and-queue shape lives).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Protocol, TypeVar, runtime_checkable

from pydantic import BaseModel

from loadstar.engine.models.folder import ModelFolder, format_size
from loadstar.engine.sampling import ALL_PARAMS, SamplingParams, prompt_budget

T = TypeVar("T")


@dataclass(frozen=True)
class Availability:
    available: bool
    reason: str  # e.g. "transformers 5.23.0, CPU" or "exllamav2 is not installed"


@dataclass(frozen=True)
class Assessment:
    can_load: bool
    reason: str  # human words: "GGUF file, dequantized by transformers" / "8-bit: only 4-bit is supported"
    priority: int = 0  # higher wins; 100 = made for this format, 50 = works, 10 = works if asked for


@dataclass(frozen=True)
class LoadedModelInfo:
    """What is loaded, for status lines and the API's model list."""

    name: str
    loader: str
    device: str
    dtype: str
    context_length: int | None
    details: str = ""
    # What the model can do beyond streaming text (FEATURE_* below); the API refuses a request
    # that needs a feature the loaded model lacks, with a one-line reason.
    features: frozenset[str] = frozenset()


FEATURE_GRAMMAR = "grammar"  # constrains its output to a JSON schema (OutputSpec.json_schema)
FEATURE_LOGPROBS = "logprobs"  # gives each token's log probability and the top alternatives
FEATURE_EMBEDDINGS = "embeddings"  # turns texts into vectors (LoadedModel.embed)


@dataclass(frozen=True)
class TextEmbedding:
    """A text's vector (unit length, so a dot product is the cosine) and the tokens it took."""

    vector: tuple[float, ...]
    tokens: int

    @classmethod
    def of(cls, values: list[float], tokens: int) -> TextEmbedding:
        """``values`` scaled to unit length (a zero vector stays as it is)."""
        norm = sum(v * v for v in values) ** 0.5
        return cls(tuple(v / norm for v in values) if norm else tuple(values), tokens)


@dataclass(frozen=True)
class TokenChoice:
    """A token and its log probability under the model (before sampling settings)."""

    token: str  # its text (a byte sequence that is not UTF-8 on its own is shown with U+FFFD)
    bytes: bytes
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token, its log probability, and the most likely tokens at its place."""

    chosen: TokenChoice
    top: tuple[TokenChoice, ...] = ()


@dataclass(frozen=True)
class OutputSpec:
    """What a request asks of the output beyond text (given to a model only when it has the feature).

    ``json_schema``: the reply must be JSON that follows this schema (``{"type": "object"}`` for
    "any JSON object"); a model with FEATURE_GRAMMAR constrains its sampling to it, and the engine
    validates the reply either way. ``logprobs``: None, or how many alternatives to give per token
    (0 = the chosen token's log probability only); needs FEATURE_LOGPROBS.
    """

    json_schema: Mapping[str, Any] | None = None
    logprobs: int | None = None

    @property
    def plain(self) -> bool:
        return self.json_schema is None and self.logprobs is None


@dataclass(frozen=True)
class StreamPiece:
    """A piece of generated text and how many tokens it took."""

    text: str
    tokens: int
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token, when the request asked for them


class CancelToken:
    """Set by whoever owns a generation; checked by the loader between tokens."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


class LoadedModel:
    """What a loader's ``load`` returns: subclass it and override what your model does.

    Set ``info`` in ``__init__``; implement ``count_tokens``, ``unload`` and one of ``stream``
    (a generator) or ``stream_to`` (pushes pieces to ``emit``): each has a default made from the
    other. The class attributes are the defaults the engine relies on, so it never probes.
    """

    info: LoadedModelInfo
    # The model's own chat template (None: the engine picks a named format or plain completion)
    # and the special tokens templates may use (bos_token, eos_token, ...).
    chat_template: str | None = None
    special_tokens: Mapping[str, str] = MappingProxyType({})
    # Names of the SamplingParams fields this model honours (ALL_PARAMS for all); a changed field
    # outside it is ignored with a notice to the user, never silently.
    supported_params: frozenset[str] = ALL_PARAMS
    # Set when chats are rendered elsewhere (a remote server applies its own template): the
    # engine then looks for no local prompt format and names this in the notice.
    chat_rendered_by: str | None = None
    # Continuous batching: a model with ``max_batch`` > 1 also implements ``open_batch``, and the
    # engine decodes up to that many requests together (see DecodeBatch). 1: one at a time.
    max_batch: int = 1

    def count_tokens(self, text: str) -> int:
        """Tokens ``text`` takes in this model's tokenizer (as a prompt, special tokens included)."""
        raise NotImplementedError(f"{type(self).__name__} does not count tokens")

    def fit_prompt(self, tokens: list[int], params: SamplingParams) -> list[int]:
        """A prompt's token ids cut to their last ``prompt_budget`` when they exceed it (the oldest
        text goes first; the engine tells the user), for a loader that tokenizes itself."""
        budget = prompt_budget(params, self.info.context_length)
        return tokens[-budget:] if budget is not None and len(tokens) > budget else tokens

    def stream(
        self, prompt: str, params: SamplingParams, cancel: CancelToken, *, seed: int, output: OutputSpec | None = None,
    ) -> Iterator[StreamPiece]:
        """Generate from ``prompt`` and yield text as it comes; stop soon after ``cancel`` is set.

        ``prompt`` is sent as it is (chat prompts already carry their special tokens). Stops at the
        model's end-of-sequence token or after ``params.max_new_tokens`` tokens. ``output`` comes
        only to a model whose ``info.features`` name what it asks for (FEATURE_GRAMMAR,
        FEATURE_LOGPROBS). The default runs ``stream_to`` on a helper thread.
        """
        if type(self).stream_to is LoadedModel.stream_to:
            raise NotImplementedError(f"{type(self).__name__} implements neither stream nor stream_to")
        abandoned = _EitherToken(cancel)

        def produce(emit: Callable[[StreamPiece], None]) -> None:
            self.stream_to(prompt, params, abandoned, seed=seed, emit=emit, **_output(output))

        # When the consumer goes away, the token is cancelled before the helper is joined: the
        # model stops generating for nobody.
        yield from pump(produce, name="loadstar-generate", stop=abandoned.cancel)

    def stream_to(
        self, prompt: str, params: SamplingParams, cancel: CancelToken, *, seed: int,
        emit: Callable[[StreamPiece], None], output: OutputSpec | None = None,
    ) -> None:
        """``stream`` on the calling thread (the model's engine core, engine/models/core.py), handing each piece to
        ``emit``: the engine calls this one. The default drives ``stream`` and stops when
        ``cancel`` is set (the request was stopped, or a stop string was hit)."""
        for piece in self.stream(prompt, params, cancel, seed=seed, **_output(output)):
            emit(piece)
            if cancel.cancelled:
                return

    def open_batch(self) -> DecodeBatch:
        """The model's batch (only called when ``max_batch`` > 1)."""
        raise NotImplementedError(f"{type(self).__name__} does not batch")

    def embed(self, texts: list[str]) -> list[TextEmbedding]:
        """One vector per text, pooled as the model's header says (else the mean over its tokens) and
        scaled to unit length; only called on a model whose ``info.features`` name FEATURE_EMBEDDINGS.
        Raise ``BadRequestError`` for a text it cannot take (too long)."""
        raise NotImplementedError(f"{type(self).__name__} gives no embeddings")

    def unload(self) -> None:
        """Free the model's memory (RAM and GPU). The object is unusable afterwards."""


def _output(output: OutputSpec | None) -> dict[str, OutputSpec]:
    # ``output`` is passed on only when given, so a model without the features never sees it.
    return {"output": output} if output is not None else {}


class _EitherToken(CancelToken):
    """Cancelled when the outer token is, or when this one is (the consumer went away)."""

    def __init__(self, outer: CancelToken) -> None:
        super().__init__()
        self._outer = outer

    @property
    def cancelled(self) -> bool:
        return self._outer.cancelled or super().cancelled


_END = object()


def pump(
    produce: Callable[[Callable[[T], None]], None], *, cancel: CancelToken | None = None,
    poll: float = 0.25, name: str = "loadstar-pump", stop: Callable[[], None] | None = None,
) -> Generator[T, None, None]:
    """Run ``produce(put)`` on a helper thread and yield what it puts, in order.

    What ``produce`` raises is raised here. With ``cancel``, the iterator ends within ``poll``
    seconds of it being set even while ``produce`` is silent (a server that has not answered).
    When the iterator ends or is closed, ``stop()`` is called (close the connection ``produce``
    reads from) and the helper thread is joined (up to 5 s), so ``produce`` must return soon
    once it is no longer wanted.
    """
    items: queue.Queue[Any] = queue.Queue()

    def run() -> None:
        try:
            produce(items.put)
        except BaseException as error:  # handed to the consumer, raised there
            items.put(_Raised(error))
        finally:
            items.put(_END)

    worker = threading.Thread(target=run, name=name, daemon=True)
    worker.start()
    try:
        while True:
            try:
                item = items.get(timeout=poll if cancel is not None else None)
            except queue.Empty:
                if cancel is not None and cancel.cancelled:
                    return
                continue
            if item is _END:
                return
            if isinstance(item, _Raised):
                raise item.error
            yield item
            if cancel is not None and cancel.cancelled:
                return
    finally:
        if stop is not None and worker.is_alive():
            stop()
        worker.join(timeout=5)


@dataclass(frozen=True)
class _Raised:
    error: BaseException


@dataclass(frozen=True)
class SequenceStep:
    """What one decode step gave one sequence of a batch."""

    piece: StreamPiece | None = None  # new text and the tokens it took (None: still reading its prompt)
    done: bool = False  # ended: end of sequence, max_new_tokens, or the context is full


class DecodeBatch(Protocol):
    """Sequences decoded together, each with its own KV cache, sampler and seed (continuous batching).

    Everything runs on the model's engine core thread (engine/models/core.py). A sequence's tokens never depend on the others
    in the batch: greedy answers are the answers the model gives alone.
    """

    def add(
        self, key: int, prompt: str, params: SamplingParams, *, seed: int, output: OutputSpec | None = None
    ) -> None:
        """Start a sequence for ``prompt`` (the engine adds at most ``max_batch``); its prompt is
        read during the next steps. Raises with a one-line reason for a prompt it cannot take.
        ``output=OutputSpec(...)`` comes only to a model with the features it needs."""

    def step(self) -> dict[int, SequenceStep]:
        """One forward pass: each decoding sequence gains a token, and waiting prompts are read
        (in chunks). Returns what changed, by key; a sequence that is ``done`` has left."""

    def remove(self, key: int) -> None:
        """Drop a sequence now (cancelled, or a stop string): the others go on untouched."""

    def close(self) -> None:
        """Drop every sequence (the engine is done with the batch)."""


@dataclass(frozen=True)
class MemoryEstimate:
    """What a load would take, for the Model tab (shown next to the loader options as they change)."""

    weights: int  # bytes the weights take once loaded (RAM or VRAM)
    kv_cache: int | None = None  # bytes of keys and values for ``sequences`` requests of ``context`` tokens, when known
    context: int | None = None
    sequences: int = 1  # requests decoded together, each with ``context`` tokens of KV cache
    grows: bool = False  # the KV cache is allocated as requests use it (else all of it at load)
    # The share of it (weights and KV cache alike) that goes to a GPU, 0 to 1: set by a loader whose
    # options place layers rather than name a device (llama.cpp's n_gpu_layers). None: the options'
    # ``device`` says where all of it goes.
    gpu_share: float | None = None

    def describe(self, free: int | None = None, gpu_free: int | None = None) -> str:
        """One line for the Model tab; ``free``: the free RAM, ``gpu_free``: the GPU's free memory."""
        parts, after = [f"{format_size(self.weights)} of weights"], ""
        kv = self.kv_cache if self.context else None
        if kv is not None and self.grows:
            kv //= self.sequences  # one full-context request's; the others' only as they use it
            parts.append(f"{format_size(kv)} of KV cache for a request of {self.context:,} tokens")
            after = " The KV cache grows as used" + (
                f", up to {format_size(self.kv_cache or 0)} with {self.sequences} requests at once." if self.sequences > 1 else ".")
        elif kv is not None:
            each = f" ({self.sequences} requests × {self.context:,} tokens)" if self.sequences > 1 else f" for {self.context:,} tokens"
            parts.append(f"{format_size(kv)} of KV cache{each}")
        total = self.weights + (kv or 0)
        share = self.gpu_share or 0.0
        in_ram = round(total * (1 - share))
        room = f" (free now: {format_size(free)}{'' if free >= in_ram else ', too little'})" if free and in_ram else ""
        if share:
            on_gpu = round(total * share)
            there = f", {format_size(gpu_free)} free there{'' if gpu_free >= on_gpu else ', too little'}" if gpu_free else ""
            room += f"; {'all' if share >= 1 else f'{share:.0%}'} of it on the GPU ({format_size(on_gpu)}{there})"
        return f"About {format_size(total)}: {' + '.join(parts)}{room}.{after}"


@runtime_checkable
class Loader(Protocol):
    name: str
    Options: type[BaseModel]

    def availability(self) -> Availability:
        """Whether this loader can run on this machine; must not import heavy packages just to say no."""

    def assess(self, folder: ModelFolder) -> Assessment:
        """Whether this loader can load ``folder``, with a priority and a reason either way."""

    def load(self, folder: ModelFolder, options: BaseModel) -> LoadedModel:
        """Load the model; raise ``loadstar.ModelLoadError`` with a one-line reason on failure."""

    # Optional, used when present: ``estimate_memory(folder, options) -> MemoryEstimate | None`` says
    # what a load with these options would take, without loading (the Model tab shows it as options
    # change); None when it cannot tell for this folder. ``runs_in_worker = False`` (a class attribute)
    # keeps the loader's models in the server process: for a loader with no native code of its own
    # (a client of a remote server); every other loader's models live in a worker process each, so
    # the loader goes over as its class (importable by name) and its plain-data attributes (JSON).
