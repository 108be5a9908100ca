"""A submitted generation request's handle: its events in order, its own cancel.

The consumer iterates ``events()`` (or awaits them on an event loop after ``listen``) or calls
``result()``; the generation service's parts hand it events with ``emit``.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable, Iterator

from loadstar.engine.generation.requests import Finished, GenerationEvent, GenerationRequest, Queued
from loadstar.engine.models.loader_api import CancelToken


class GenerationHandle:
    """One submitted request: iterate ``events()``, or call ``result()``; ``cancel()`` any time."""

    def __init__(self, request: GenerationRequest, job_id: int, on_cancel: Callable[[GenerationHandle], None]) -> None:
        self.request = request
        self.id = job_id
        self.lane = request.model or ""  # the model it goes to (the service sets it when it is queued)
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

    def next_event(self, timeout: float | None = None) -> GenerationEvent | None:
        """The next event, or None when none came within ``timeout`` seconds (None: wait for one).
        Mixing this with ``events()`` on one handle is the consumer's business: each event comes once."""
        try:
            return self._events.get(timeout=timeout)
        except queue.Empty:
            return None

    def result(self) -> Finished:
        """Wait for the end and return the ``Finished`` event (with the whole text)."""
        if self._finished is not None:
            return self._finished
        for event in self.events():
            if isinstance(event, Finished):
                return event
        raise AssertionError("unreachable")

    # -- for the service and its parts ----------------------------------------------------------

    def emit(self, event: GenerationEvent) -> None:
        """Hand ``event`` to whoever consumes this handle (once ``Finished`` has gone, nothing more goes)."""
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
