"""The generation service: typed requests, token streaming, per-request cancel, a fair queue.

All model work runs on the engine's one model thread. A model that batches (``max_batch`` and
``open_batch``, see loader_api.py) decodes several requests together, each with its own KV cache
and sampler: a waiting request joins at the next decode step and leaves when it is done, and Stop
removes one sequence without touching the others. Other models serve one request at a time.
Waiting requests are taken round-robin by owner (a browser session, an API key), so one busy
client cannot starve the others. Each request gets a ``GenerationHandle``: its
events (queue position, start, text, finish) and its own ``cancel()``; cancelling one request
never touches another.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import queue
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from typing import Any, Protocol

from loadstar.engine.chat.json_reply import parse_reply
from loadstar.engine.chat.tool_calls import ToolCall, find_calls
from loadstar.engine.errors import BadRequestError, WorkerCrashed, one_line
from loadstar.engine.generation.pipeline import PreparedRequest, RequestPipeline
from loadstar.engine.generation.requests import (
    Finished,
    FinishReason,
    GenerationEvent,
    GenerationRequest,
    Queued,
    Started,
    TextDelta,
)
from loadstar.engine.generation.stop_strings import StopStringFilter
from loadstar.engine.metrics import GenerationMetrics
from loadstar.engine.models.loader_api import (
    FEATURE_GRAMMAR,
    FEATURE_LOGPROBS,
    CancelToken,
    DecodeBatch,
    LoadedModel,
    OutputSpec,
    StreamPiece,
    TokenLogprob,
)
from loadstar.engine.models.model_thread import ModelThread
from loadstar.engine.plugins.extension_api import ReplyDraft
from loadstar.engine.sampling import SEED_MAX, SamplingParams

log = logging.getLogger(__name__)



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
    def use(self, name: str | None = None) -> AbstractContextManager[LoadedModel | None]:
        """Hold loaded model ``name`` (None: the current one), or None, for one generation or batch."""

    def resolve(self, name: str | None) -> str | None:
        """The name of the loaded model a request for ``name`` goes to (None: the current one), or None."""

    # Optional: ``load_pending`` (bool), True while a model load waits; no request joins a running
    # batch then, so the batch drains and the load gets the model thread.


class GenerationHandle:
    """One submitted request: iterate ``events()``, or call ``result()``; ``cancel()`` any time."""

    def __init__(self, request: GenerationRequest, job_id: int, on_cancel: Callable[[GenerationHandle], None]) -> None:
        self.request = request
        self.id = job_id
        self._token = CancelToken()
        self._events: queue.SimpleQueue[GenerationEvent] = queue.SimpleQueue()
        self._on_cancel = on_cancel
        self._finished: Finished | None = None
        self._last_position: int | None = None
        self._lock = threading.Lock()
        self._listener: Callable[[GenerationEvent], None] | None = None

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

    def result(self) -> Finished:
        """Wait for the end and return the ``Finished`` event (with the whole text)."""
        if self._finished is not None:
            return self._finished
        for event in self.events():
            if isinstance(event, Finished):
                return event
        raise AssertionError("unreachable")

    # -- called by the service -----------------------------------------------------------------

    def _emit(self, event: GenerationEvent) -> None:
        with self._lock:  # one order for every consumer; a listener only schedules, it never blocks
            if self._finished is not None:
                return
            if isinstance(event, Queued):
                if event.position == self._last_position:
                    return
                self._last_position = event.position
            if isinstance(event, Finished):
                self._finished = event
            if self._listener is not None:
                self._listener(event)
            else:
                self._events.put(event)

    def listen(
        self, loop: asyncio.AbstractEventLoop, into: asyncio.Queue[tuple[int, GenerationEvent]] | None = None,
        tag: int = 0,
    ) -> asyncio.Queue[tuple[int, GenerationEvent]]:
        """Deliver the events to ``loop`` instead (with ``call_soon_threadsafe``), as ``(tag, event)``
        pairs: a client on an event loop awaits them with no thread of its own, and several handles
        (the choices of one request) can share one queue. Call it on that loop; events that came
        before are in the queue first. ``events()`` gets nothing afterwards."""
        delivered: asyncio.Queue[tuple[int, GenerationEvent]] = into if into is not None else asyncio.Queue()
        with self._lock:
            while True:
                try:
                    delivered.put_nowait((tag, self._events.get_nowait()))
                except queue.Empty:
                    break

            def deliver(event: GenerationEvent) -> None:
                try:
                    loop.call_soon_threadsafe(delivered.put_nowait, (tag, event))
                except RuntimeError:  # the loop is closed: nobody is listening any more
                    pass

            self._listener = deliver
        return delivered


class _Run:
    """One request on the model thread: prepared and started, fed the model's pieces, finished.

    The same for a request served alone and for one in a batch: stop strings, the reply's
    extensions, the finish reason and the notices do not depend on how its tokens were made.
    """

    def __init__(self, handle: GenerationHandle, model: LoadedModel, pipeline: RequestPipeline) -> None:
        self.handle = handle
        self.model = model
        self._pipeline = pipeline
        self.notices: list[str] = []
        self.parts: list[str] = []
        self.tokens = 0
        self.prepared: PreparedRequest | None = None
        self.seed = 0
        self.started = 0.0
        self.stops = StopStringFilter(())
        self.token: CancelToken = handle.cancel_token
        self.logprobs: list[TokenLogprob] = []  # shown
        self._unshown: list[TokenLogprob] = []  # of text the stop-string filter still holds
        self.calls: tuple[ToolCall, ...] = ()

    @property
    def params(self) -> SamplingParams:
        assert self.prepared is not None
        return self.prepared.params

    @property
    def prompt(self) -> str:
        assert self.prepared is not None
        return self.prepared.prompt

    @property
    def stopped(self) -> bool:
        """Cancelled, or a stop string was met: no more tokens are wanted."""
        return self.token.cancelled

    def start(self) -> bool:
        """Prepare the request and send ``Started``; False (with ``Finished`` sent) when it cannot run."""
        handle = self.handle
        if handle.cancelled:
            handle._emit(Finished(reason="cancelled", text=""))
            return False
        try:
            prepared = self.prepared = self._pipeline.prepare(self.model, handle.request, self.notices)
        except BadRequestError as error:
            handle._emit(Finished(reason="error", text="", error=str(error), notices=tuple(self.notices), bad_request=True))
            return False
        lacking = self._lacking(handle.request.output)
        if lacking:
            handle._emit(Finished(reason="error", text="", error=lacking, notices=tuple(self.notices), bad_request=True))
            return False
        params = prepared.params
        self.seed = params.seed if params.seed >= 0 else secrets.randbelow(SEED_MAX + 1)
        self.stops = StopStringFilter(prepared.stop)
        self.token = _RunToken(handle.cancel_token, self.stops)
        handle._emit(Started(
            model=self.model.info.name, prompt=prepared.prompt, prompt_tokens=prepared.prompt_tokens, seed=self.seed,
            format_name=prepared.format_name, format_why=prepared.format_why, notices=prepared.notices,
        ))
        self.started = time.perf_counter()
        return True

    def _lacking(self, output: OutputSpec) -> str | None:
        if output.logprobs is not None and FEATURE_LOGPROBS not in self.model.info.features:
            return f"{self.model.info.loader} does not give log probabilities (logprobs)"
        return None

    @property
    def output(self) -> dict[str, OutputSpec]:
        """``output=`` for the model's call: what it asked for that the model can do, or nothing."""
        request, features = self.handle.request, self.model.info.features
        asked = request.output
        schema = request.tools.call_schema() if request.tools.must_call else asked.json_schema
        spec = OutputSpec(
            json_schema=schema if FEATURE_GRAMMAR in features else None,
            logprobs=asked.logprobs if FEATURE_LOGPROBS in features else None,
        )
        return {} if spec.plain else {"output": spec}

    def by_extension(self) -> bool:
        """Whether an extension produced the reply itself (the ``generate`` hook)."""
        assert self.prepared is not None
        prepared, request = self.prepared, self.handle.request
        effective = dataclasses.replace(  # what the extensions made of the request
            request, messages=prepared.messages, params=prepared.params, stop=prepared.stop,
            prompt=prepared.prompt if request.prompt is not None else None,
        )
        return self._pipeline.generate(effective, prepared.prompt, self.model, self.token, self.take, self.seed,
                                       self.notices)

    def take(self, piece: StreamPiece) -> None:
        self.tokens += piece.tokens
        self._unshown.extend(piece.logprobs)
        self._show(self.stops.feed(piece.text))

    def _show(self, text: str) -> None:
        if text:
            self.parts.append(text)
            shown, self._unshown = tuple(self._unshown), []
            self.logprobs.extend(shown)
            self.handle._emit(TextDelta(text, shown))

    def end(self, error: str | None = None, *, bad_request: bool = False) -> None:
        """Send ``Finished``: the reason (stop, length, cancelled, tool calls) from how it ended, or the error."""
        if error is not None:
            self.handle._emit(self._finished("error", error, bad_request=bad_request))
            return
        self._show(self.stops.flush())
        params = self.params
        if self.stops.stopped:
            reason: FinishReason = "stop"
        elif self.handle.cancelled:
            reason = "cancelled"
        elif self.tokens >= params.max_new_tokens:
            reason = "length"
        else:
            reason = "stop"
        tools = self.handle.request.tools
        if tools.active and reason != "cancelled":
            content, self.calls = find_calls("".join(self.parts), tools.names)
            if self.calls:
                self.parts, reason = [content], "tool_calls"
            elif tools.must_call:
                cut = f" before max_tokens ({params.max_new_tokens}) ran out" if reason == "length" else ""
                self.handle._emit(self._finished(
                    "error", f"the model did not call a tool{cut}, though tool_choice requires one{self._unconstrained}"))
                return
        schema = self.handle.request.output.json_schema
        if schema is not None and reason not in ("cancelled", "tool_calls"):
            problem = self._check_json(schema, reason)
            if problem:
                self.handle._emit(self._finished("error", problem))
                return
        if reason != "cancelled" and not "".join(self.parts).strip():
            self.notices.append(empty_reply_reason(reason, self.tokens, self.stops.matched, params.max_new_tokens))
        self.handle._emit(self._finished(reason))

    def _check_json(self, schema: Mapping[str, Any], reason: FinishReason) -> str | None:
        """Why the reply is not the JSON asked for, or None (a fenced reply is unwrapped). A reply
        cut by max_tokens is not an error: it ends "length", with a notice saying its JSON is cut."""
        text, problem = parse_reply("".join(self.parts), schema)
        if problem is None:
            self.parts = [text]
            return None
        if reason == "length":  # the client's max_tokens, not a failure: finish "length", as OpenAI does
            self.notices.append(
                f"the reply ran out of tokens (max_tokens {self.params.max_new_tokens}) before its JSON ended")
            return None
        return problem + self._unconstrained

    @property
    def _unconstrained(self) -> str:
        """Said after a reply that is not what was asked for, when the model could not be held to it."""
        info = self.model.info
        return "" if FEATURE_GRAMMAR in info.features else f" ({info.loader} cannot constrain its output)"

    def _finished(self, reason: FinishReason, error: str | None = None, *, bad_request: bool = False) -> Finished:
        text = "".join(self.parts)
        prepared = self.prepared
        if reason != "error" and prepared is not None:
            draft = ReplyDraft(text=text, reason=reason, model=self.model.info.name, owner=self.handle.owner,
                               messages=prepared.messages, prompt=prepared.prompt)
            text = self._pipeline.finish(draft, self.notices)
        return Finished(
            reason=reason, text=text, prompt_tokens=prepared.prompt_tokens if prepared else 0,
            completion_tokens=self.tokens, seed=self.seed if prepared else None,
            seconds=time.perf_counter() - self.started if prepared else 0.0, error=error, notices=tuple(self.notices),
            logprobs=tuple(self.logprobs) if self.handle.request.output.logprobs is not None else None,
            tool_calls=self.calls, bad_request=bad_request,
        )


class GenerationService:
    """Runs generation requests on the model held by ``slot``: decoded together when the model
    batches (continuous batching), else one at a time; waiting requests join in fair order."""

    def __init__(
        self, slot: ModelSlot, model_thread: ModelThread | None = None, pipeline: RequestPipeline | None = None
    ) -> None:
        self._slot = slot
        self._pipeline = pipeline or RequestPipeline()
        self._own_thread = model_thread is None  # made here, so stopped here
        self._model_thread = model_thread or ModelThread()
        self._cond = threading.Condition()
        self._waiting: OrderedDict[str, deque[GenerationHandle]] = OrderedDict()
        self._running: dict[int, GenerationHandle] = {}
        self._batching = False  # the model now served batches (queue positions follow its rule)
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
            mine += [h for h in self._running.values() if h.owner == owner]
        for handle in mine:
            handle.cancel()
        return len(mine)

    def has_work(self, owner: str) -> bool:
        """Whether ``owner`` has a request waiting or running."""
        with self._cond:
            running = any(h.owner == owner and h.finished is None for h in self._running.values())
            return running or bool(self._waiting.get(owner))

    @property
    def waiting(self) -> int:
        with self._cond:
            return sum(len(jobs) for jobs in self._waiting.values())

    @property
    def running(self) -> int:
        """Requests being generated now (more than one when the model batches)."""
        with self._cond:
            return len(self._running)

    @property
    def busy(self) -> bool:
        with self._cond:
            return bool(self._running)

    def close(self) -> None:
        """Cancel everything and stop the worker."""
        with self._cond:
            self._closed = True
            pending = [h for jobs in self._waiting.values() for h in jobs]
            running = list(self._running.values())
            self._cond.notify_all()
        for handle in pending + running:
            handle.cancel()
        if self._worker is not None:
            self._worker.join(timeout=30)
        if self._own_thread:
            self._model_thread.stop()

    # -- queue ---------------------------------------------------------------------------------

    def _service_order(self) -> list[GenerationHandle]:
        """Waiting handles in the order they will run: ``_take``'s rule played forward.

        Owners take turns; when the model batches, an owner with nothing running goes first (the
        requests taken before it count as running: they join the batch while the others go on).
        """
        waiting = OrderedDict((owner, deque(jobs)) for owner, jobs in self._waiting.items())
        running = {h.owner for h in self._running.values()} if self._batching else set()
        order: list[GenerationHandle] = []
        while waiting:
            owner = next((o for o in waiting if o not in running), next(iter(waiting)))
            jobs = waiting.pop(owner)
            order.append(jobs.popleft())
            if jobs:
                waiting[owner] = jobs
            if self._batching:
                running.add(owner)
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

    def _take(self, wait: bool, joins: Callable[[GenerationHandle], bool] | None = None) -> GenerationHandle | None:
        """The next waiting handle in fair order (the owner goes to the back of the line), now running.

        ``wait``: block until there is one (None once closed); else None when none is waiting or
        a model load is waiting for the model (no one joins then, so the batch drains). ``joins``:
        None when the next handle in that order cannot join (it is for another model): it stays first.
        """
        with self._cond:
            if wait:
                while not self._closed and not self._waiting:
                    self._cond.wait()
            if self._closed or not self._waiting or (not wait and self._slot_load_pending()):
                return None
            running = {h.owner for h in self._running.values()}
            # an owner with nothing running goes before one who already has a request in the batch
            owner = next((o for o in self._waiting if o not in running), next(iter(self._waiting)))
            if joins is not None and not joins(self._waiting[owner][0]):
                return None
            jobs = self._waiting.pop(owner)
            handle = jobs.popleft()
            if jobs:  # this owner goes to the back of the line
                self._waiting[owner] = jobs
            self._running[handle.id] = handle
            self._announce_positions()
            return handle

    def _slot_load_pending(self) -> bool:
        return bool(getattr(self._slot, "load_pending", False))

    def _done(self, handle: GenerationHandle) -> None:
        with self._cond:
            self._running.pop(handle.id, None)
        self._record(handle)

    def _start_worker(self) -> None:
        if self._worker is None:
            self._worker = threading.Thread(target=self._work, name="loadstar-generation", daemon=True)
            self._worker.start()

    def _work(self) -> None:
        while True:
            handle = self._take(wait=True)
            if handle is None:
                return
            try:
                self._model_thread.call(self._serve, handle)  # all model work on one thread (see model_thread.py)
            except Exception as error:  # never let one request kill the worker
                log.exception("generation %s failed", handle.id)
                handle._emit(Finished(reason="error", text="", error=one_line(error)))
            finally:
                with self._cond:
                    stranded = list(self._running.values())
                for left in stranded:  # a failure in the batch loop leaves no request hanging
                    left._emit(Finished(reason="error", text="", error="generation stopped unexpectedly"))
                    self._done(left)

    def _serve(self, handle: GenerationHandle) -> None:
        wanted = handle.request.model
        with self._slot.use(wanted) as model:
            if model is None:
                error = f"{wanted} is not loaded" if wanted else "no model is loaded: load one first"
                handle._emit(Finished(reason="error", text="", error=error))
                self._done(handle)
                return
            self._batching = model.max_batch > 1
            if self._batching:
                self._serve_batch(model, handle)
            else:
                self._serve_alone(model, handle)

    def _serve_alone(self, model: LoadedModel, handle: GenerationHandle) -> None:
        run = _Run(handle, model, self._pipeline)
        try:
            if not run.start():
                return
            try:
                if run.by_extension():
                    pass
                else:
                    model.stream_to(run.prompt, run.params, run.token, seed=run.seed, emit=run.take, **run.output)
            except Exception as error:
                log.exception("generation %s failed in the model", handle.id)
                run.end(one_line(error), bad_request=isinstance(error, BadRequestError))
                return
            run.end()
        finally:
            self._done(handle)

    def _serve_batch(self, model: LoadedModel, first: GenerationHandle) -> None:
        """Continuous batching: waiting requests join at the next step (fair order, up to the
        model's ``max_batch``); each leaves when it is done."""
        batch: DecodeBatch = model.open_batch()
        limit = int(model.max_batch)
        runs: dict[int, _Run] = {}
        arrived: GenerationHandle | None = first
        serving = self._slot.resolve(first.request.model)

        def joins(handle: GenerationHandle) -> bool:  # a request for another model waits until this batch drains
            return self._slot.resolve(handle.request.model) == serving

        try:
            while True:
                while len(runs) < limit:
                    handle = arrived or self._take(wait=False, joins=joins)
                    arrived = None
                    if handle is None:
                        break
                    run = _Run(handle, model, self._pipeline)
                    if not run.start():
                        self._done(handle)
                    elif not self._by_extension(run) and self._join(batch, run):
                        runs[handle.id] = run
                if not runs:
                    return
                try:
                    steps = batch.step()
                except WorkerCrashed as error:  # the batch is gone with its worker: wait for the model's reload
                    for key in list(runs):
                        self._end(runs.pop(key), one_line(error))
                    return
                except Exception as error:
                    log.exception("a batched decode step failed")
                    for key in list(runs):
                        batch.remove(key)
                        self._end(runs.pop(key), one_line(error))
                    continue
                for key, step in steps.items():
                    run = runs[key]
                    if step.piece is not None:
                        run.take(step.piece)
                    if step.done:
                        del runs[key]
                        self._end(run)
                for key in [key for key, run in runs.items() if run.stopped]:
                    batch.remove(key)  # Stop or a stop string: this sequence leaves, the others go on
                    self._end(runs.pop(key))
        finally:
            for run in runs.values():
                self._end(run, "generation stopped unexpectedly")
            batch.close()

    def _join(self, batch: DecodeBatch, run: _Run) -> bool:
        """Add ``run`` to the batch; a request the model refuses ends with its error, alone."""
        try:
            batch.add(run.handle.id, run.prompt, run.params, seed=run.seed, **run.output)
        except Exception as error:
            log.exception("generation %s could not join the batch", run.handle.id)
            self._end(run, one_line(error), bad_request=isinstance(error, BadRequestError))
            return False
        return True

    def _by_extension(self, run: _Run) -> bool:
        try:
            produced = run.by_extension()
        except Exception as error:
            log.exception("generation %s failed in an extension", run.handle.id)
            self._end(run, one_line(error))
            return True
        if produced:
            self._end(run)
        return produced

    def _end(self, run: _Run, error: str | None = None, *, bad_request: bool = False) -> None:
        try:
            run.end(error, bad_request=bad_request)
        finally:
            self._done(run.handle)


def empty_reply_reason(reason: FinishReason, tokens: int, stop: str | None, max_new_tokens: int) -> str:
    """Why a reply came out empty, in words (an empty reply never comes without its reason)."""
    if stop is not None:
        return f"the reply is empty: the stop string {stop!r} came first"
    if reason == "length":
        return f"the reply is empty: max_new_tokens ({max_new_tokens}) ran out before any visible text"
    if tokens <= 1:  # the end-of-sequence token itself may be counted
        return "the reply is empty: the model ended it at its first token (end of sequence); check the prompt format"
    return f"the reply is empty: the model wrote {tokens} tokens of whitespace or special tokens, then ended it"
