"""The scheduler: one lane's loop, feeding a model's engine core and taking back its steps.

Each resident model has a lane (the service runs one scheduler thread per lane with work). The
loop takes waiting requests of its lane in fair order, up to the model's ``max_batch``, prepares
each (extensions, the prompt, its token count) and adds it to the model's core
(engine/models/core.py), which decodes them together in its own thread or process. The core's
steps come back through a queue; each request's pieces go to its output processor (output.py:
stop strings, tool calls, JSON, reply hooks). Stop, a stop string or a client that went away
removes only that request, at once: the core is told, nobody waits for it. A core that crashed
or stopped responding ends its requests with one line (from its client). Nothing here blocks on
a model step, so two models decode at the same time and one's long prompt never holds up another.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Protocol

from loadstar.engine.errors import BadRequestError, LoadstarError, one_line
from loadstar.engine.generation.handle import GenerationHandle
from loadstar.engine.generation.output import RequestRun
from loadstar.engine.generation.pipeline import RequestPipeline
from loadstar.engine.generation.requests import Finished
from loadstar.engine.models.core_client import CoreClient, SeqItem

log = logging.getLogger(__name__)

POLL_S = 0.5  # how often a lane with requests running looks at cancels even when no step comes

# What a lane's queue gets: steps or errors by request id (an empty list: "look again").
LaneItems = list[tuple[int, SeqItem]]


class ModelSlot(Protocol):
    def use(self, name: str | None = None) -> AbstractContextManager[CoreClient | None]:
        """Hold resident model ``name`` (None: the current one), or None, while a lane serves it."""

    def resolve(self, name: str | None) -> str | None:
        """The name of the loaded model a request for ``name`` goes to (None: the current one), or None."""

    # Optional: ``serves(model) -> bool``, False once ``model`` was replaced or unloaded (its lane
    # then lets its running requests end and takes no more on it).


class Scheduler:
    """Serves one lane on its model: ``take(lane)`` gives its next waiting request (or None),
    ``done(handle)`` marks one ended, ``closed()`` says the service is shutting down."""

    def __init__(
        self, slot: ModelSlot, pipeline: RequestPipeline, take: Callable[[str], GenerationHandle | None],
        done: Callable[[GenerationHandle], None], closed: Callable[[], bool],
    ) -> None:
        self._slot = slot
        self._pipeline = pipeline
        self._take = take
        self._done = done
        self._closed = closed

    def fail_waiting(self, lane: str) -> None:
        """The lane's model is not loaded: each waiting request ends with one line."""
        while (handle := self._take(lane)) is not None:
            wanted = handle.request.model
            error = f"{wanted} is not loaded" if wanted else "no model is loaded: load one first"
            handle.emit(Finished(reason="error", text="", error=error))
            self._done(handle)

    def serve(self, lane: str, model: CoreClient, items: queue.SimpleQueue[LaneItems]) -> None:
        """Run the lane's requests on ``model`` until none runs or waits (``items``: the lane's queue)."""
        limit = max(1, int(model.max_batch))
        runs: dict[int, RequestRun] = {}
        try:
            while True:
                current = self.serves(model)
                taken: list[GenerationHandle] = []
                while current and len(runs) + len(taken) < limit and not self._closed():
                    handle = self._take(lane)
                    if handle is None:
                        break
                    taken.append(handle)
                for run in self._start(taken, model, items):
                    runs[run.handle.id] = run
                if not runs:
                    return
                try:
                    got = items.get(timeout=POLL_S)
                except queue.Empty:
                    got = []
                while True:  # everything that came, before looking at cancels
                    self._apply(got, runs)
                    try:
                        got = items.get_nowait()
                    except queue.Empty:
                        break
                for key in [key for key, run in runs.items() if run.stopped]:
                    model.cancel(key)  # Stop or a stop string: this request leaves, the others go on
                    self._end(runs.pop(key))
        finally:
            for key, run in runs.items():
                model.cancel(key)
                self._end(run, "generation stopped unexpectedly")

    def serves(self, model: CoreClient) -> bool:
        """Whether ``model`` is still the one its lane's name stands for (see ``ModelSlot``)."""
        serves = getattr(self._slot, "serves", None)
        return serves is None or bool(serves(model))

    def _start(self, handles: list[GenerationHandle], model: CoreClient, items: queue.SimpleQueue[LaneItems]) -> list[RequestRun]:
        """Prepare the taken requests (their prompts' tokens counted in one question to the core) and
        add them to it; the ones that started."""
        drafted = []
        for handle in handles:
            run = RequestRun(handle, model, self._pipeline)
            draft = run.draft()
            if draft is None:
                self._done(handle)
            else:
                drafted.append((run, draft))
        if not drafted:
            return []
        try:
            counts = model.count_many([draft.prompt for _, draft in drafted])
        except LoadstarError as error:
            for run, _ in drafted:
                run.fail(error)
                self._done(run.handle)
            return []
        started = []
        for (run, draft), count in zip(drafted, counts, strict=True):
            if not run.begin(draft, count):
                self._done(run.handle)
            elif self._add(run, model, items):
                started.append(run)
        return started

    def _add(self, run: RequestRun, model: CoreClient, items: queue.SimpleQueue[LaneItems]) -> bool:
        try:
            produced = run.by_extension()
        except Exception as error:
            log.exception("generation %s failed in an extension", run.handle.id)
            self._end(run, one_line(error))
            return False
        if produced:
            self._end(run)
            return False
        try:
            model.add(run.handle.id, run.prompt, run.params, seed=run.seed, sink=items.put, **run.output)
        except LoadstarError as error:
            self._end(run, str(error), bad_request=isinstance(error, BadRequestError))
            return False
        return True

    def _apply(self, got: LaneItems, runs: dict[int, RequestRun]) -> None:
        for key, item in got:
            run = runs.get(key)
            if run is None or (run.stopped and not isinstance(item, LoadstarError)):
                continue  # (what a stopped request's core made before the cancel reached it is dropped)
            if isinstance(item, LoadstarError):
                del runs[key]
                self._end(run, str(item), bad_request=isinstance(item, BadRequestError))
                continue
            if item.piece is not None:
                run.take(item.piece)
            if item.done:
                del runs[key]
                self._end(run)

    def _end(self, run: RequestRun, error: str | None = None, *, bad_request: bool = False) -> None:
        try:
            run.end(error, bad_request=bad_request)
        except Exception as failure:  # a reply hook that broke: the request still ends
            log.exception("ending generation %s failed", run.handle.id)
            run.handle.emit(Finished(reason="error", text="", error=one_line(failure)))
        finally:
            self._done(run.handle)
