"""The generation service: typed requests, token streaming, per-request cancel, a fair queue.

One worker thread runs one generation at a time on the loaded model, so two users never
interleave tokens. Waiting requests are served round-robin by owner (a browser session, an API
key), so one busy client cannot starve the others. Each request gets a ``GenerationHandle``: its
events (queue position, start, text, finish) and its own ``cancel()``; cancelling one request
never touches another.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import queue
import secrets
import threading
import time
from collections import OrderedDict, deque
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal, Protocol, Union

from engine.chat import ChatMessage, check_text
from engine.errors import BadRequestError, one_line
from engine.extension_api import ReplyDraft
from engine.loader_api import CancelToken, LoadedModel, StreamPiece
from engine.metrics import GenerationMetrics
from engine.model_thread import ModelThread
from engine.request_pipeline import RequestPipeline
from engine.sampling import SEED_MAX, SamplingParams
from engine.stop_strings import StopStringFilter

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "cancelled", "error"]
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256


@dataclass(frozen=True)
class GenerationRequest:
    """Either chat ``messages`` (the model's chat template is applied) or a raw ``prompt``."""

    params: SamplingParams = field(default_factory=SamplingParams)
    messages: tuple[ChatMessage, ...] = ()
    prompt: str | None = None
    owner: str = "local"  # who may cancel it and whose turn it is in the queue
    stop: tuple[str, ...] = ()  # stop strings: generation ends before the first one, which is not shown
    continue_last: bool = False  # the last message is an assistant reply to continue, not to answer

    def __post_init__(self) -> None:
        if bool(self.messages) == (self.prompt is not None):
            raise BadRequestError("a generation request needs either chat messages or a prompt, not both")
        if self.continue_last and (not self.messages or self.messages[-1].role != "assistant"):
            raise BadRequestError("there is no reply to continue")
        if self.prompt is not None and not self.prompt:
            raise BadRequestError("the prompt is empty")
        for text in (self.prompt or "", *self.stop):
            check_text(text)
        if len(self.stop) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_LENGTH for s in self.stop):
            raise BadRequestError(
                f"stop strings: at most {MAX_STOP_STRINGS}, each 1 to {MAX_STOP_LENGTH} characters"
            )


@dataclass(frozen=True)
class Queued:
    position: int  # 1 = next to run


@dataclass(frozen=True)
class Started:
    model: str
    prompt: str
    prompt_tokens: int
    seed: int
    format_name: str | None = None  # the prompt format used for a chat; None for raw prompts
    format_why: str | None = None  # how that format was found: the model's template, its card, ...
    notices: tuple[str, ...] = ()  # what the user should know: ignored parameters, a cut prompt, ...


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class Finished:
    reason: FinishReason
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seed: int | None = None
    seconds: float = 0.0
    error: str | None = None  # one line, when reason == "error"
    notices: tuple[str, ...] = ()

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0


GenerationEvent = Union[Queued, Started, TextDelta, Finished]


class _RunToken(CancelToken):
    """What the model checks between tokens: the request was cancelled, or a stop string was hit."""

    def __init__(self, request_token: CancelToken, stops: StopStringFilter) -> None:
        super().__init__()
        self._request = request_token
        self._stops = stops

    @property
    def cancelled(self) -> bool:
        return self._request.cancelled or self._stops.stopped


class ModelSlot(Protocol):
    def use(self) -> AbstractContextManager[LoadedModel | None]:
        """Hold the loaded model (or None) for the duration of one generation."""


class GenerationHandle:
    """One submitted request: iterate ``events()``, or call ``result()``; ``cancel()`` any time."""

    def __init__(self, request: GenerationRequest, job_id: int, on_cancel: Callable[["GenerationHandle"], None]) -> None:
        self.request = request
        self.id = job_id
        self._token = CancelToken()
        self._events: queue.SimpleQueue[GenerationEvent] = queue.SimpleQueue()
        self._on_cancel = on_cancel
        self._finished: Finished | None = None
        self._last_position: int | None = None

    @property
    def owner(self) -> str:
        return self.request.owner

    @property
    def cancel_token(self) -> CancelToken:
        return self._token

    @property
    def cancelled(self) -> bool:
        return self._token.cancelled

    @property
    def finished(self) -> Finished | None:
        return self._finished

    def cancel(self) -> None:
        """Stop this request: dropped from the queue if waiting, stopped between tokens if running."""
        if not self._token.cancelled and self._finished is None:
            self._token.cancel()
            self._on_cancel(self)

    def events(self) -> Iterator[GenerationEvent]:
        """Events in order, ending with exactly one ``Finished``."""
        while True:
            event = self._events.get()
            yield event
            if isinstance(event, Finished):
                return

    def next_event(self, timeout: float) -> GenerationEvent | None:
        """The next event, or None if none came within ``timeout`` seconds (0: do not wait)."""
        try:
            return self._events.get(timeout=timeout) if timeout > 0 else self._events.get_nowait()
        except queue.Empty:
            return None

    def result(self) -> Finished:
        """Wait for the end and return the ``Finished`` event (with the whole text)."""
        for event in self.events():
            if isinstance(event, Finished):
                return event
        raise AssertionError("unreachable")

    # -- called by the service -----------------------------------------------------------------

    def _emit(self, event: GenerationEvent) -> None:
        if self._finished is not None:
            return
        if isinstance(event, Queued):
            if event.position == self._last_position:
                return
            self._last_position = event.position
        if isinstance(event, Finished):
            self._finished = event
        self._events.put(event)


class GenerationService:
    """Runs generation requests one at a time on the model held by ``slot``."""

    def __init__(
        self, slot: ModelSlot, model_thread: ModelThread | None = None, pipeline: RequestPipeline | None = None
    ) -> None:
        self._slot = slot
        self._pipeline = pipeline or RequestPipeline()
        self._model_thread = model_thread or ModelThread()
        self._cond = threading.Condition()
        self._waiting: OrderedDict[str, deque[GenerationHandle]] = OrderedDict()
        self._running: GenerationHandle | None = None
        self._worker: threading.Thread | None = None
        self._closed = False
        self._ids = itertools.count(1)
        self.metrics = GenerationMetrics()

    # -- public --------------------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> GenerationHandle:
        """Queue ``request``; the handle's first event is its queue position."""
        with self._cond:
            if self._closed:
                raise BadRequestError("the generation service is shut down")
            handle = GenerationHandle(request, next(self._ids), self._cancelled)
            self._waiting.setdefault(request.owner, deque()).append(handle)
            self._start_worker()
            self._announce_positions()
            self._cond.notify_all()
        return handle

    def cancel_owner(self, owner: str) -> int:
        """Cancel every waiting or running request of ``owner``; returns how many."""
        with self._cond:
            mine = list(self._waiting.get(owner, ()))
            if self._running is not None and self._running.owner == owner:
                mine.append(self._running)
        for handle in mine:
            handle.cancel()
        return len(mine)

    def has_work(self, owner: str) -> bool:
        """Whether ``owner`` has a request waiting or running."""
        with self._cond:
            running = self._running is not None and self._running.owner == owner and self._running.finished is None
            return running or bool(self._waiting.get(owner))

    @property
    def waiting(self) -> int:
        with self._cond:
            return sum(len(jobs) for jobs in self._waiting.values())

    @property
    def busy(self) -> bool:
        with self._cond:
            return self._running is not None

    def close(self) -> None:
        """Cancel everything and stop the worker."""
        with self._cond:
            self._closed = True
            pending = [h for jobs in self._waiting.values() for h in jobs]
            running = self._running
            self._cond.notify_all()
        for handle in pending:
            handle.cancel()
        if running is not None:
            running.cancel()
        if self._worker is not None:
            self._worker.join(timeout=30)

    # -- queue ---------------------------------------------------------------------------------

    def _service_order(self) -> list[GenerationHandle]:
        """Waiting handles in the order they will run: round-robin over owners."""
        queues = [list(jobs) for jobs in self._waiting.values()]
        order = []
        for round_ in itertools.count():
            row = [jobs[round_] for jobs in queues if len(jobs) > round_]
            if not row:
                return order
            order.extend(row)
        return order

    def _announce_positions(self) -> None:
        for position, handle in enumerate(self._service_order(), start=1):
            handle._emit(Queued(position))

    def _cancelled(self, handle: GenerationHandle) -> None:
        with self._cond:
            jobs = self._waiting.get(handle.owner)
            if jobs is None or handle not in jobs:
                return  # running: the loader sees the token between tokens
            jobs.remove(handle)
            if not jobs:
                del self._waiting[handle.owner]
            self._announce_positions()
        handle._emit(Finished(reason="cancelled", text=""))
        self._record(handle)

    def _record(self, handle: GenerationHandle) -> None:
        done = handle.finished
        if done is not None:
            self.metrics.record(done.reason, done.prompt_tokens, done.completion_tokens, done.seconds)

    def _next(self) -> GenerationHandle | None:
        with self._cond:
            while not self._closed and not self._waiting:
                self._cond.wait()
            if self._closed:
                return None
            owner, jobs = next(iter(self._waiting.items()))
            handle = jobs.popleft()
            del self._waiting[owner]
            if jobs:  # this owner goes to the back of the line
                self._waiting[owner] = jobs
            self._running = handle
            self._announce_positions()
            return handle

    def _start_worker(self) -> None:
        if self._worker is None:
            self._worker = threading.Thread(target=self._work, name="loadstar-generation", daemon=True)
            self._worker.start()

    def _work(self) -> None:
        while True:
            handle = self._next()
            if handle is None:
                return
            try:
                self._model_thread.call(self._run, handle)  # all model work on one thread (see model_thread.py)
            except Exception as error:  # never let one request kill the worker
                log.exception("generation %s failed", handle.id)
                handle._emit(Finished(reason="error", text="", error=one_line(error)))
            finally:
                with self._cond:
                    self._running = None
                self._record(handle)

    def _run(self, handle: GenerationHandle) -> None:
        request = handle.request
        if handle.cancelled:
            handle._emit(Finished(reason="cancelled", text=""))
            return
        with self._slot.use() as model:
            if model is None:
                handle._emit(Finished(reason="error", text="", error="no model is loaded: load one first"))
                return
            notices: list[str] = []
            try:
                prepared = self._pipeline.prepare(model, request, notices)
            except BadRequestError as error:
                handle._emit(Finished(reason="error", text="", error=str(error), notices=tuple(notices)))
                return
            params = prepared.params
            seed = params.seed if params.seed >= 0 else secrets.randbelow(SEED_MAX + 1)
            handle._emit(Started(
                model=model.info.name, prompt=prepared.prompt, prompt_tokens=prepared.prompt_tokens, seed=seed,
                format_name=prepared.format_name, format_why=prepared.format_why, notices=prepared.notices,
            ))
            started = time.perf_counter()
            parts: list[str] = []
            tokens = 0
            stops = StopStringFilter(prepared.stop)

            def show(text: str) -> None:
                if text:
                    parts.append(text)
                    handle._emit(TextDelta(text))

            token = _RunToken(handle.cancel_token, stops)

            def take(piece: StreamPiece) -> None:
                nonlocal tokens
                tokens += piece.tokens
                show(stops.feed(piece.text))

            def finished(reason: FinishReason, error: str | None = None) -> Finished:
                text = "".join(parts)
                if reason != "error":
                    draft = ReplyDraft(text=text, reason=reason, model=model.info.name, owner=request.owner,
                                       messages=prepared.messages, prompt=prepared.prompt)
                    text = self._pipeline.finish(draft, notices)
                return Finished(
                    reason=reason, text=text, prompt_tokens=prepared.prompt_tokens, completion_tokens=tokens,
                    seed=seed, seconds=time.perf_counter() - started, error=error, notices=tuple(notices),
                )

            try:
                effective = dataclasses.replace(  # what the extensions made of the request
                    request, messages=prepared.messages, params=params, stop=prepared.stop,
                    prompt=prepared.prompt if request.prompt is not None else None,
                )
                if self._pipeline.generate(effective, prepared.prompt, model, token, take, seed, notices):
                    pass  # an extension produced the reply
                elif (stream_to := getattr(model, "stream_to", None)) is not None:
                    stream_to(prepared.prompt, params, token, seed=seed, emit=take)  # the fast path: no hand-off
                else:
                    for piece in model.stream(prepared.prompt, params, token, seed=seed):
                        take(piece)
                        if token.cancelled:
                            break
                show(stops.flush())
            except Exception as error:
                log.exception("generation %s failed in the model", handle.id)
                handle._emit(finished("error", one_line(error)))
                return
            if stops.stopped:
                reason: FinishReason = "stop"
            elif handle.cancelled:
                reason = "cancelled"
            elif tokens >= params.max_new_tokens:
                reason = "length"
            else:
                reason = "stop"
            if reason != "cancelled" and not "".join(parts).strip():
                notices.append(empty_reply_reason(reason, tokens, stops.matched, params.max_new_tokens))
            handle._emit(finished(reason))


def empty_reply_reason(reason: FinishReason, tokens: int, stop: str | None, max_new_tokens: int) -> str:
    """Why a reply came out empty, in words (an empty reply never comes without its reason)."""
    if stop is not None:
        return f"the reply is empty: the stop string {stop!r} came first"
    if reason == "length":
        return f"the reply is empty: max_new_tokens ({max_new_tokens}) ran out before any visible text"
    if tokens <= 1:  # the end-of-sequence token itself may be counted
        return "the reply is empty: the model ended it at its first token (end of sequence); check the prompt format"
    return f"the reply is empty: the model wrote {tokens} tokens of whitespace or special tokens, then ended it"
