"""The scheduler: the loop on the model thread that runs requests on their model.

A model that batches (``max_batch`` > 1 and ``open_batch``, see loader_api.py) decodes several
requests together, each with its own KV cache and sampler: the scheduler adds a waiting request
(taken in fair order, for the same model) at the next step, steps the batch, and lets each
request leave when it is done or stopped, without touching the others. Other models serve one
request at a time. What each request's pieces become is the output processor's (output.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Protocol

from loadstar.engine.errors import BadRequestError, WorkerCrashed, one_line
from loadstar.engine.generation.fair_queue import FairQueue
from loadstar.engine.generation.handle import GenerationHandle
from loadstar.engine.generation.output import RequestRun
from loadstar.engine.generation.pipeline import RequestPipeline
from loadstar.engine.generation.requests import Finished
from loadstar.engine.models.loader_api import DecodeBatch, LoadedModel

log = logging.getLogger(__name__)


class ModelSlot(Protocol):
    def use(self, name: str | None = None) -> AbstractContextManager[LoadedModel | None]:
        """Hold loaded model ``name`` (None: the current one), or None, for one generation or batch."""

    def resolve(self, name: str | None) -> str | None:
        """The name of the loaded model a request for ``name`` goes to (None: the current one), or None."""

    # Optional: ``load_pending`` (bool), True while a model load waits; no request joins a running
    # batch then, so the batch drains and the load gets the model thread.



class Scheduler:
    """Runs each taken request on its model; ``take(joins)`` gives the next waiting request that may
    join a running batch (or None), ``done(handle)`` marks one ended."""

    def __init__(
        self, slot: ModelSlot, pipeline: RequestPipeline, queue: FairQueue,
        take: Callable[[Callable[[GenerationHandle], bool]], GenerationHandle | None],
        done: Callable[[GenerationHandle], None],
    ) -> None:
        self._slot = slot
        self._pipeline = pipeline
        self._queue = queue
        self._take = take
        self._done = done

    def serve(self, handle: GenerationHandle) -> None:
        """Serve ``handle`` on the model it asks for, with what joins it while it runs (the model thread calls this)."""
        wanted = handle.request.model
        with self._slot.use(wanted) as model:
            if model is None:
                error = f"{wanted} is not loaded" if wanted else "no model is loaded: load one first"
                handle.emit(Finished(reason="error", text="", error=error))
                self._done(handle)
                return
            self._queue.batching = model.max_batch > 1
            if self._queue.batching:
                self._serve_batch(model, handle)
            else:
                self._serve_alone(model, handle)

    def _serve_alone(self, model: LoadedModel, handle: GenerationHandle) -> None:
        run = RequestRun(handle, model, self._pipeline)
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
        runs: dict[int, RequestRun] = {}
        arrived: GenerationHandle | None = first
        serving = self._slot.resolve(first.request.model)

        def joins(handle: GenerationHandle) -> bool:  # a request for another model waits until this batch drains
            return self._slot.resolve(handle.request.model) == serving

        try:
            while True:
                while len(runs) < limit:
                    handle = arrived or self._take(joins)
                    arrived = None
                    if handle is None:
                        break
                    run = RequestRun(handle, model, self._pipeline)
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

    def _join(self, batch: DecodeBatch, run: RequestRun) -> bool:
        """Add ``run`` to the batch; a request the model refuses ends with its error, alone."""
        try:
            batch.add(run.handle.id, run.prompt, run.params, seed=run.seed, **run.output)
        except Exception as error:
            log.exception("generation %s could not join the batch", run.handle.id)
            self._end(run, one_line(error), bad_request=isinstance(error, BadRequestError))
            return False
        return True

    def _by_extension(self, run: RequestRun) -> bool:
        try:
            produced = run.by_extension()
        except Exception as error:
            log.exception("generation %s failed in an extension", run.handle.id)
            self._end(run, one_line(error))
            return True
        if produced:
            self._end(run)
        return produced

    def _end(self, run: RequestRun, error: str | None = None, *, bad_request: bool = False) -> None:
        try:
            run.end(error, bad_request=bad_request)
        finally:
            self._done(run.handle)
