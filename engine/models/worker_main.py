"""What runs inside a model worker: one process per loaded model (``python -m loadstar.engine.models.worker_main``).

The server starts it (engine/models/worker.py) with one end of a socket pair, sends the loader
plugin and the folder, and from then on asks for calls on the loaded model. Every piece of model
work runs on this process's main thread, one call after another (the model thread of the
in-process engine: torch's OpenMP team belongs to the thread that first computes with it). A
second thread reads the socket so that a cancel reaches a running generation at once; it is the
only thing it does besides queueing calls. When the socket closes (the server went away or
unloads the model) the process ends, and all its memory, RAM and GPU, goes back to the system.

Messages are pickled tuples between Loadstar's own processes (never a model's file):
server to worker ``(call_id, op, args)``; worker to server ``(call_id, kind, payload)`` with kind
``piece`` (a streamed StreamPiece), ``result`` or ``error`` (a LoadstarError, worded here).
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import sys
import threading
from multiprocessing.connection import Connection
from typing import Any

from loadstar.engine.errors import LoadstarError, ModelLoadError, WorkerError, one_line
from loadstar.engine.models.load_failures import load_error
from loadstar.engine.models.loader_api import CancelToken, LoadedModel

log = logging.getLogger("loadstar.worker")

# The ops the server sends (engine/models/worker.py uses these names).
LOAD = "load"  # (loader, folder, options) -> the model's facts (WorkerFacts fields)
CALL = "call"  # (method, args, kwargs) -> the model's method's result
STREAM = "stream"  # (prompt, params, seed, output) -> pieces, then None
BATCH = "batch"  # (method, args, kwargs) -> the result of the model's batch's method
CANCEL = "cancel"  # (call_id,) -> cancels that stream; answered by nothing
PIECE, RESULT, ERROR = "piece", "result", "error"
FACTS = ("info", "chat_template", "special_tokens", "supported_params", "max_batch", "chat_rendered_by")


class _Worker:
    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._send_lock = threading.Lock()
        self._calls: queue.SimpleQueue[tuple[int, str, tuple] | None] = queue.SimpleQueue()
        self._cancels: dict[int, CancelToken] = {}
        self._model: LoadedModel | None = None
        self._batch: Any = None

    def send(self, call_id: int, kind: str, payload: Any) -> None:
        with self._send_lock:
            self._conn.send((call_id, kind, payload))

    def read(self) -> None:
        """The reader thread: queue calls, apply cancels; end the process when the server is gone."""
        try:
            while True:
                call_id, op, args = self._conn.recv()
                if op == CANCEL:
                    token = self._cancels.get(args[0])
                    if token is not None:
                        token.cancel()
                    continue
                if op == STREAM:
                    self._cancels[call_id] = CancelToken()
                self._calls.put((call_id, op, args))
        except (EOFError, OSError):
            pass
        # The server closed its end (unload) or died: nothing will ask for this model again.
        os._exit(0)

    def serve(self) -> None:
        while True:
            item = self._calls.get()
            if item is None:
                return
            call_id, op, args = item
            try:
                self.send(call_id, RESULT, self._do(call_id, op, args))
            except BaseException as error:
                self.send(call_id, ERROR, _portable(error))
            finally:
                self._cancels.pop(call_id, None)

    def _do(self, call_id: int, op: str, args: tuple) -> Any:
        if op == LOAD:
            return self._load(*args)
        model = self._model
        if model is None:
            raise WorkerError("no model is loaded in this worker")
        if op == CALL:
            method, call_args, kwargs = args
            return getattr(model, _public(method))(*call_args, **kwargs)
        if op == STREAM:
            prompt, params, seed, output = args
            extra = {"output": output} if output is not None else {}
            token = self._cancels[call_id]
            model.stream_to(prompt, params, token, seed=seed, emit=lambda piece: self.send(call_id, PIECE, piece), **extra)
            return None
        if op == BATCH:
            method, call_args, kwargs = args
            if self._batch is None:
                self._batch = model.open_batch()
            return getattr(self._batch, _public(method))(*call_args, **kwargs)
        raise WorkerError(f"unknown worker op {op!r}")

    def _load(self, loader: Any, folder: Any, options: Any) -> dict[str, Any]:
        try:
            model = loader.load(folder, options)
        except LoadstarError:
            raise
        except Exception as error:
            raise load_error(loader.name, folder.name, error, [w.path for w in folder.weight_files], folder.path) from None
        if not isinstance(model, LoadedModel):
            raise ModelLoadError(f"{loader.name} returned a {type(model).__name__}, not a loadstar.LoadedModel: "
                                 "its plugin needs updating")
        self._model = model
        facts = {name: getattr(model, name) for name in FACTS}
        facts["special_tokens"] = dict(facts["special_tokens"])  # a read-only mapping does not pickle
        return facts


def _public(name: str) -> str:
    if name.startswith("_"):
        raise WorkerError(f"{name} is not part of a model's interface")
    return name


def _portable(error: BaseException) -> LoadstarError:
    """The error as the server can raise it: a LoadstarError as it is, anything else worded here in one
    line (its class may live in a package the server never imports, such as torch)."""
    if isinstance(error, LoadstarError):
        try:
            pickle.loads(pickle.dumps(error))
            return error
        except Exception:
            return WorkerError(str(error))
    log.error("in the model worker: %s", one_line(error), exc_info=not isinstance(error, KeyboardInterrupt))
    return WorkerError(one_line(error))


def main(argv: list[str]) -> int:
    """``worker_main FD LOGLEVEL``: serve the server on the socket ``FD``."""
    fd, level = int(argv[0]), argv[1] if len(argv) > 1 else "INFO"
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s[worker]: %(message)s",
                        datefmt="%H:%M:%S")
    conn = Connection(fd)
    hello = conn.recv()  # the server's sys.path, so plugins import here as they do there
    sys.path[:] = [*hello["sys_path"], *(p for p in sys.path if p not in hello["sys_path"])]
    worker = _Worker(conn)
    threading.Thread(target=worker.read, name="loadstar-worker-reader", daemon=True).start()
    worker.serve()
    return 0


if __name__ == "__main__":
    # Run the module's own copy, not __main__'s: what the worker pickles then names its real module.
    from loadstar.engine.models import worker_main

    sys.exit(worker_main.main(sys.argv[1:]))
