"""The generation service: typed requests in, token streams out, per-request cancel, a fair queue.

It is three parts put together: the fair queue (fair_queue.py: who waits, who runs next, and the
positions shown), the scheduler on the model thread (scheduler.py: batch joins, steps, leaves),
and the output processor (output.py: stop strings, tool calls, JSON, reply hooks). All model work
runs on the engine's one model thread. Each request gets a ``GenerationHandle`` (handle.py): its
events (queue position, start, text, finish) and its own ``cancel()``; cancelling one request
never touches another.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable

from loadstar.engine.errors import BadRequestError, one_line
from loadstar.engine.generation.fair_queue import FairQueue
from loadstar.engine.generation.handle import GenerationHandle
from loadstar.engine.generation.output import empty_reply_reason
from loadstar.engine.generation.pipeline import RequestPipeline
from loadstar.engine.generation.requests import Finished, GenerationRequest, Queued
from loadstar.engine.generation.scheduler import ModelSlot, Scheduler
from loadstar.engine.metrics import GenerationMetrics
from loadstar.engine.models.model_thread import ModelThread

log = logging.getLogger(__name__)

__all__ = ["GenerationHandle", "GenerationService", "ModelSlot", "empty_reply_reason"]


class GenerationService:
    """Runs generation requests on the models held by ``slot``: decoded together when a model
    batches (continuous batching), else one at a time; waiting requests are taken in fair order."""

    def __init__(
        self, slot: ModelSlot, model_thread: ModelThread | None = None, pipeline: RequestPipeline | None = None
    ) -> None:
        self._slot = slot
        self._own_thread = model_thread is None  # made here, so stopped here
        self._model_thread = model_thread or ModelThread()
        self._queue = FairQueue()
        self._cond = self._queue.cond
        self._scheduler = Scheduler(slot, pipeline or RequestPipeline(), self._queue, self._take_joining, self._done)
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
            self._queue.put(handle)
            self._start_worker()
            self._announce_positions()
            self._cond.notify_all()
        return handle

    def cancel_owner(self, owner: str) -> int:
        """Cancel every waiting or running request of ``owner``; returns how many."""
        with self._cond:
            mine = self._queue.waiting(owner) + [h for h in self._queue.running() if h.owner == owner]
        for handle in mine:
            handle.cancel()
        return len(mine)

    def has_work(self, owner: str) -> bool:
        """Whether ``owner`` has a request waiting or running."""
        with self._cond:
            running = any(h.owner == owner and h.finished is None for h in self._queue.running())
            return running or bool(self._queue.waiting(owner))

    @property
    def waiting(self) -> int:
        with self._cond:
            return len(self._queue.waiting())

    @property
    def running(self) -> int:
        """Requests being generated now (more than one when the model batches)."""
        with self._cond:
            return len(self._queue.running())

    @property
    def busy(self) -> bool:
        with self._cond:
            return bool(self._queue.running())

    def close(self) -> None:
        """Cancel everything and stop the worker."""
        with self._cond:
            self._closed = True
            pending = self._queue.waiting()
            running = self._queue.running()
            self._cond.notify_all()
        for handle in pending + running:
            handle.cancel()
        if self._worker is not None:
            self._worker.join(timeout=30)
        if self._own_thread:
            self._model_thread.stop()

    # -- queue ---------------------------------------------------------------------------------

    def _announce_positions(self) -> None:
        for position, handle in enumerate(self._queue.order(), start=1):
            handle.emit(Queued(position))

    def _cancelled(self, handle: GenerationHandle) -> None:
        with self._cond:
            if not self._queue.remove(handle):
                return  # running: the loader sees the token between tokens
            self._announce_positions()
        handle.emit(Finished(reason="cancelled", text=""))
        self._record(handle)

    def _record(self, handle: GenerationHandle) -> None:
        done = handle.finished
        if done is not None:
            self.metrics.record(done.reason, done.prompt_tokens, done.completion_tokens, done.seconds)

    def _take_waiting(self) -> GenerationHandle | None:
        """The next request in fair order, now running; blocks until there is one (None once closed)."""
        with self._cond:
            while not self._closed and self._queue.empty:
                self._cond.wait()
            if self._closed:
                return None
            handle = self._queue.take()
            self._announce_positions()
            return handle

    def _take_joining(self, joins: Callable[[GenerationHandle], bool]) -> GenerationHandle | None:
        """The next request in fair order that may join a running batch, now running; None when none
        waits, when it is for another model, or while a model load waits (the batch then drains)."""
        with self._cond:
            if self._closed or self._queue.empty or self._slot_load_pending():
                return None
            handle = self._queue.take(joins)
            if handle is not None:
                self._announce_positions()
            return handle

    def _slot_load_pending(self) -> bool:
        return bool(getattr(self._slot, "load_pending", False))

    def _done(self, handle: GenerationHandle) -> None:
        with self._cond:
            self._queue.done(handle)
        self._record(handle)

    def _start_worker(self) -> None:
        if self._worker is None:
            self._worker = threading.Thread(target=self._work, name="loadstar-generation", daemon=True)
            self._worker.start()

    def _work(self) -> None:
        while True:
            handle = self._take_waiting()
            if handle is None:
                return
            try:
                self._model_thread.call(self._scheduler.serve, handle)  # all model work on one thread (model_thread.py)
            except Exception as error:  # never let one request kill the worker
                log.exception("generation %s failed", handle.id)
                handle.emit(Finished(reason="error", text="", error=one_line(error)))
            finally:
                with self._cond:
                    stranded = self._queue.running()
                for left in stranded:  # a failure in the batch loop leaves no request hanging
                    left.emit(Finished(reason="error", text="", error="generation stopped unexpectedly"))
                    self._done(left)
