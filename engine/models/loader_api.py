"""The contract between the engine and loader plugins.

A loader answers three questions and does one thing:
- ``availability()``: can it run on this machine at all (package installed, CUDA present)?
- ``assess(folder)``: can it load this folder, with what priority, and why (or why not)?
- ``Options``: the typed load options it accepts (unknown fields rejected).
- ``load(folder, options)``: return a ``LoadedModel``.

A ``LoadedModel`` is the one small interface the UI and the API use: its chat template and
special tokens (the engine renders prompts), the sampling parameters it honours, count tokens,
stream text for a prompt with a cancel handle, unload.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Protocol, runtime_checkable

from pydantic import BaseModel

from loadstar.engine.models.folder import ModelFolder, format_size
from loadstar.engine.sampling import SamplingParams


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


@runtime_checkable
class LoadedModel(Protocol):
    info: LoadedModelInfo
    # The model's own chat template (None: the engine picks a named format or plain completion)
    # and the special tokens templates may use (bos_token, eos_token, ...).
    chat_template: str | None
    special_tokens: Mapping[str, str]
    # Names of the SamplingParams fields this model honours (engine.sampling.ALL_PARAMS for all);
    # a changed field outside it is ignored with a notice to the user, never silently.
    supported_params: frozenset[str]

    def count_tokens(self, text: str) -> int:
        """Tokens ``text`` takes in this model's tokenizer (as a prompt, special tokens included)."""

    def stream(
        self, prompt: str, params: SamplingParams, cancel: CancelToken, *, seed: int
    ) -> Iterator[StreamPiece]:
        """Generate from ``prompt`` and yield text as it comes; stop soon after ``cancel`` is set.

        ``prompt`` is sent as it is (chat prompts already carry their special tokens). Stops at the
        model's end-of-sequence token or after ``params.max_new_tokens`` tokens.
        """

    def unload(self) -> None:
        """Free the model's memory (RAM and GPU). The object is unusable afterwards."""

    # Optional fast path, used when present: ``stream_to(prompt, params, cancel, *, seed, emit)``
    # generates on the calling thread (the engine's model thread) and hands each StreamPiece to
    # ``emit`` instead of yielding it, which saves a thread hand-off per request.
    #
    # A model whose ``info.features`` name FEATURE_GRAMMAR or FEATURE_LOGPROBS also takes
    # ``output: OutputSpec`` as a keyword of ``stream``, ``stream_to`` and ``DecodeBatch.add``;
    # the engine passes it only to such a model and only when the request asks for something.
    #
    # Optional continuous batching, used when present: ``max_batch`` (int, > 1) and
    # ``open_batch() -> DecodeBatch``. The engine then decodes up to ``max_batch`` requests
    # together: a waiting request joins at the next step and leaves when it is done. A model
    # without them is served one request at a time.


@dataclass(frozen=True)
class SequenceStep:
    """What one decode step gave one sequence of a batch."""

    piece: StreamPiece | None = None  # new text and the tokens it took (None: still reading its prompt)
    done: bool = False  # ended: end of sequence, max_new_tokens, or the context is full


class DecodeBatch(Protocol):
    """Sequences decoded together, each with its own KV cache, sampler and seed (continuous batching).

    Everything runs on the engine's model thread. A sequence's tokens never depend on the others
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
    kv_cache: int | None = None  # bytes of keys and values at ``context`` tokens, when known
    context: int | None = None
    sequences: int = 1  # requests decoded together, each with ``context`` tokens of KV cache

    def describe(self, free: int | None = None) -> str:
        parts = [f"{format_size(self.weights)} of weights"]
        if self.kv_cache is not None and self.context:
            each = f" ({self.sequences} requests × {self.context:,} tokens)" if self.sequences > 1 else f" for {self.context:,} tokens"
            parts.append(f"{format_size(self.kv_cache)} of KV cache{each}")
        total = self.weights + (self.kv_cache or 0)
        room = f" (free now: {format_size(free)}{'' if free >= total else ', too little'})" if free else ""
        return f"About {format_size(total)}: {' + '.join(parts)}{room}."


@runtime_checkable
class Loader(Protocol):
    name: str
    Options: type[BaseModel]

    def availability(self) -> Availability:
        """Whether this loader can run on this machine; must not import heavy packages just to say no."""

    def assess(self, folder: ModelFolder) -> Assessment:
        """Whether this loader can load ``folder``, with a priority and a reason either way."""

    def load(self, folder: ModelFolder, options: BaseModel) -> LoadedModel:
        """Load the model; raise ``engine.errors.ModelLoadError`` with a one-line reason on failure."""

    # Optional, used when present: ``estimate_memory(folder, options) -> MemoryEstimate`` says what
    # a load with these options would take, without loading (the Model tab shows it as options change).
