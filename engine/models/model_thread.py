"""One thread for all model work: loading, generating, unloading.

Measured on our 2-core CPU machines: torch's OpenMP thread team belongs to the thread that first
computes with it; generating on any other thread afterwards ran at 17.5 tok/s instead of 30 with
SmolLM2 (about 40% slower), and a server loads its model on the main thread before it serves.
So every piece of model work goes through this one long-lived thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")


class ModelThread:
    def __init__(self, name: str = "loadstar-model") -> None:
        self._name = name
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` on the model thread and return its result (or raise its exception)."""
        if threading.current_thread() is self._thread:
            return fn(*args, **kwargs)  # already there: no hand-off, no deadlock
        future: Future = Future()
        self._start()
        self._jobs.put((lambda: fn(*args, **kwargs), future))
        return future.result()

    def stop(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join(timeout=30)

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name=self._name, daemon=True)
                self._thread.start()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, future = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as error:  # handed to the caller
                future.set_exception(error)
