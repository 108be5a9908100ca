"""What runs inside a model worker: one process per loaded model (``python -m loadstar.engine.models.worker_main``).

The server starts it (engine/models/worker.py) in a session of its own with one end of a socket
pair. Messages are JSON both ways (wire.py). The first is ``hello`` (the server's ``sys.path``,
so plugins import here as there), the second ``load``: the loader's class and plain-data
attributes, the model folder's path and the loader options. The worker loads the model on its
main thread, answers ``loaded`` (the model's facts) or ``load_failed`` (one line), and from then
on its main thread runs the model's engine core (core.py). A reader thread queues what the
server sends; a heartbeat thread sends ``beat`` every second, whatever the core is doing, so
the server can tell a long step from a worker that stopped.

SIGINT is ignored (Ctrl+C is the server's to handle; it ends its workers in order). When the
server asks (``end``) or its end of the socket closes, the core unloads the model and the
process ends, and all its memory, RAM and GPU, goes back to the system.
"""

from __future__ import annotations

import importlib
import logging
import os
import queue
import signal
import sys
import threading
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from loadstar.engine.errors import LoadstarError, ModelLoadError, one_line
from loadstar.engine.models import wire
from loadstar.engine.models.core import EngineCore
from loadstar.engine.models.core_client import EXIT_WAIT_S  # after the server's end closes, the core gets this long
from loadstar.engine.models.load_failures import load_error
from loadstar.engine.models.loader_api import LoadedModel

log = logging.getLogger("loadstar.worker")



class _Outbox:
    """Sends to the server from the core and the heartbeat thread, one message at a time."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        data = wire.encode(message)
        with self._lock:
            try:
                self._conn.send_bytes(data)
            except (OSError, ValueError):
                pass  # the server is gone: the reader ends the process


def _beat(outbox: _Outbox, stop: threading.Event) -> None:
    while not stop.wait(wire.BEAT_S):
        outbox.send({"op": "beat"})


def _read(conn: Connection, inbox: queue.SimpleQueue[dict[str, Any] | None]) -> None:
    """Queue what the server sends; when its end closes, end the core (and the process, if the core hangs)."""
    try:
        while True:
            inbox.put(wire.decode(conn.recv_bytes(wire.MAX_MESSAGE_BYTES)))
    except (EOFError, OSError, wire.WireError):
        pass
    inbox.put(None)
    threading.Timer(EXIT_WAIT_S, os._exit, args=(0,)).start()


def _loader(data: Any) -> Any:
    """The loader the server described: its class, a fresh instance where it takes no arguments, then
    the server's plain-data attributes on top."""
    if not isinstance(data, dict) or not isinstance(data.get("module"), str) or not isinstance(data.get("qualname"), str):
        raise ModelLoadError("the server described no loader")
    target: Any = importlib.import_module(data["module"])
    for part in data["qualname"].split("."):
        target = getattr(target, part)
    try:
        loader = target()
    except TypeError:
        loader = target.__new__(target)
    state = data.get("state")
    if isinstance(state, dict):
        vars(loader).update(state)
    return loader


def _load(message: dict[str, Any]) -> LoadedModel:
    from loadstar.engine.models.folder import inspect_model_folder

    loader = _loader(message.get("loader"))
    folder = inspect_model_folder(Path(wire.field_of(message, "folder", str)))
    options = loader.Options.model_validate(message.get("options") or {})
    try:
        model = loader.load(folder, options)
    except LoadstarError:
        raise
    except Exception as error:
        raise load_error(loader.name, folder.name, error, [w.path for w in folder.weight_files], folder.path) from None
    if not isinstance(model, LoadedModel):
        raise ModelLoadError(f"{loader.name} returned a {type(model).__name__}, not a loadstar.LoadedModel: "
                             "its plugin needs updating")
    return model


def main(argv: list[str]) -> int:
    """``worker_main FD LOGLEVEL``: load the model the server sends on the socket ``FD`` and serve it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    fd, level = int(argv[0]), argv[1] if len(argv) > 1 else "INFO"
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s[worker]: %(message)s",
                        datefmt="%H:%M:%S")
    conn = Connection(fd)
    hello = wire.decode(conn.recv_bytes(wire.MAX_MESSAGE_BYTES))
    paths = [p for p in hello.get("sys_path", []) if isinstance(p, str)]
    sys.path[:] = [*paths, *(p for p in sys.path if p not in paths)]
    outbox = _Outbox(conn)
    stop = threading.Event()
    threading.Thread(target=_beat, args=(outbox, stop), name="loadstar-worker-beat", daemon=True).start()
    try:
        model = _load(wire.decode(conn.recv_bytes(wire.MAX_MESSAGE_BYTES)))
    except (EOFError, OSError):
        return 0
    except Exception as error:
        if not isinstance(error, LoadstarError):
            log.exception("loading failed")
        outbox.send({"op": "load_failed", "error": wire.error_data(error)})
        try:  # the server ends this worker when it has read why (an exit now would look like a crash)
            while wire.decode(conn.recv_bytes(wire.MAX_MESSAGE_BYTES)).get("op") != "end":
                pass
        except (EOFError, OSError, wire.WireError):
            pass
        stop.set()
        return 1
    outbox.send({"op": "loaded", "facts": wire.facts_data(model)})
    inbox: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
    threading.Thread(target=_read, args=(conn, inbox), name="loadstar-worker-reader", daemon=True).start()
    try:
        EngineCore(model, outbox.send, inbox).run()
    except Exception as error:
        log.error("the engine core failed: %s", one_line(error), exc_info=True)
        return 1
    finally:
        stop.set()
    return 0


if __name__ == "__main__":
    # Run the module's own copy, not __main__'s (one module object for its names).
    from loadstar.engine.models import worker_main

    sys.exit(worker_main.main(sys.argv[1:]))
