"""The generation service: typed requests in, token streams out, per-request cancel, fair queues.

It is three parts put together: the fair queue (fair_queue.py: who waits, who runs next, and the
positions shown), the scheduler (scheduler.py: one lane per model, feeding the model's engine
core and taking back its steps), and the output processor (output.py: stop strings, tool calls,
JSON, reply hooks). Each lane with work has a thread of its own, so each resident model serves
at the same time as the others. Each request gets a ``GenerationHandle`` (handle.py): its events
(queue position, start, text, finish) and its own ``cancel()``; cancelling one request never
touches another.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from loadstar.engine.errors import BadRequestError
from loadstar.engine.generation.fair_queue import FairQueue
from loadstar.engine.generation.handle import GenerationHandle
from loadstar.engine.generation.output import empty_reply_reason
from loadstar.engine.generation.pipeline import RequestPipeline
from loadstar.engine.generation.requests import Finished, GenerationRequest, Queued
from loadstar.engine.generation.scheduler import LaneItems, ModelSlot, Scheduler
from loadstar.engine.metrics import GenerationMetrics

log = logging.getLogger(__name__)

__all__ = ["GenerationHandle", "GenerationService", "ModelSlot", "empty_reply_reason"]


@dataclass
class _Lane:
    """One model's requests: its scheduler thread (while it has work) and the queue its core's steps come to."""

    name: str
    items: queue.SimpleQueue[LaneItems] = field(default_factory=queue.SimpleQueue)
    thread: threading.Thread | None = None


class GenerationService:
    """Runs generation requests on the models held by ``slot``: each model in its own lane,
    decoded together when it batches (continuous batching); waiting requests in fair order."""

    def __init__(self, slot: ModelSlot, pipeline: RequestPipeline | None = None) -> None:
        self._slot = slot
        self._queue = FairQueue()
        self._cond = self._queue.cond
        self._scheduler = Scheduler(slot, pipeline or RequestPipeline(), self._take, self._done, lambda: self._closed)
        self._lanes: dict[str, _Lane] = {}
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
            handle.lane = self._slot.resolve(request.model) or request.model or ""
            self._queue.put(handle)
            self._wake(handle.lane)
            self._announce_positions()
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
        """Cancel everything and end the lanes' threads."""
        with self._cond:
            self._closed = True
            pending = self._queue.waiting()
            running = self._queue.running()
            threads = [lane.thread for lane in self._lanes.values() if lane.thread is not None]
        for handle in pending + running:
            handle.cancel()
        for thread in threads:
            thread.join(timeout=30)

    # -- queue ---------------------------------------------------------------------------------

    def _announce_positions(self) -> None:
        for line in self._queue.order():
            for position, handle in enumerate(line, start=1):
                handle.emit(Queued(position))

    def _cancelled(self, handle: GenerationHandle) -> None:
        with self._cond:
            if not self._queue.remove(handle):
                lane = self._lanes.get(handle.lane)
                if lane is not None:
                    lane.items.put([])  # running: its lane removes it now
                return
            self._announce_positions()
        handle.emit(Finished(reason="cancelled", text=""))
        self._record(handle)

    def _record(self, handle: GenerationHandle) -> None:
        done = handle.finished
        if done is not None:
            self.metrics.record(done.reason, done.prompt_tokens, done.completion_tokens, done.seconds)

    def _take(self, lane: str) -> GenerationHandle | None:
        """The lane's next request in fair order, now running; None when none waits (or it is closing)."""
        with self._cond:
            if self._closed:
                return None
            handle = self._queue.take(lane)
            if handle is not None:
                self._announce_positions()
            return handle

    def _done(self, handle: GenerationHandle) -> None:
        with self._cond:
            self._queue.done(handle)
        self._record(handle)

    def _wake(self, name: str) -> None:
        """Start the lane's thread if it has none (the caller holds ``cond``), else tell it to look."""
        lane = self._lanes.setdefault(name, _Lane(name))
        if lane.thread is None:
            lane.thread = threading.Thread(target=self._run_lane, args=(lane,), name=f"loadstar-lane-{name or 'none'}",
                                           daemon=True)
            lane.thread.start()
        else:
            lane.items.put([])

    def _run_lane(self, lane: _Lane) -> None:
        """Serve the lane until it has nothing waiting (a new request starts it again)."""
        while True:
            try:
                with self._slot.use(lane.name or None) as model:
                    if model is None:
                        self._scheduler.fail_waiting(lane.name)
                    else:
                        with self._cond:
                            self._queue.batching[lane.name] = model.max_batch > 1
                        self._scheduler.serve(lane.name, model, lane.items)
                        if not self._scheduler.serves(model):
                            time.sleep(0.05)  # replaced: use() gives the new model once it is in
            except Exception as error:  # never let one lane's failure strand its requests
                log.exception("the %s lane failed", lane.name or "default")
                with self._cond:
                    stranded = [h for h in self._queue.running() if h.lane == lane.name]
                for left in stranded:
                    left.emit(Finished(reason="error", text="", error=f"generation stopped unexpectedly: {error}"))
                    self._done(left)
            with self._cond:
                if self._closed or not self._queue.waiting(lane=lane.name):
                    lane.thread = None
                    return
