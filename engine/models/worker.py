"""A model in a worker process: ``start_worker`` and the ``WorkerLink`` to its engine core.

Native code (llama.cpp, CUDA kernels, a hostile GGUF's parser) can fault in ways no ``except``
catches; in a worker that costs the worker, not the server. ``start_worker`` starts
``python -m loadstar.engine.models.worker_main`` in a session of its own (Ctrl+C in the
terminal reaches the server alone, which ends its workers in order), with only the environment
a model needs (no Hub token, no API keys), on one end of a socket pair. It sends the loader (its
class and its plain-data attributes), the folder and the options as JSON, and the worker loads
the model and serves it with its engine core (core.py). Every message is JSON (wire.py): what a
worker sends is parsed, never unpickled; one that is not the protocol's ends the worker.

Three threads here per worker: one writes (a caller never blocks on the socket), one reads and
hands each message to the core's client, one watches the heartbeat. The worker sends a ``beat``
every second from a thread of its own, so a long step does not delay it; when nothing comes for
``deadline`` seconds (30 by default: a stopped process, a hung driver, swapped out), the worker
is reported as not responding (its client's ``problem``), its sequences and questions end with
one line, and ending it (Stop, Unload, Load) kills it after a short grace. If it speaks again
before that, it is taken back.

If the worker dies (a signal, an OOM kill, ``kill -9``), everything waiting on it ends with
``WorkerCrashed`` ("the model's worker crashed (SIGSEGV, signal 11)") and ``on_exit`` is called
once with that line: the model manager decides what comes next.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from multiprocessing.connection import Connection
from typing import Any

from loadstar.engine.errors import (
    LoadCancelled,
    LoadstarError,
    ModelLoadError,
    WorkerCrashed,
    WorkerNotResponding,
)
from loadstar.engine.models import wire
from loadstar.engine.models.core_client import EXIT_WAIT_S, CoreClient
from loadstar.engine.models.folder import ModelFolder

log = logging.getLogger(__name__)

DEADLINE_S = 30.0  # a worker silent this long is not responding
SILENT_GRACE_S = 3.0  # a worker asked to end that stays silent this long is killed

# What a worker's environment keeps of the server's: what Python, the loaders and their native
# libraries read. Anything else (HF_TOKEN, API keys, passwords) stays in the server.
_KEEP = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TEMP", "TMP", "SHELL", "TERM",
         "VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PYTHONHASHSEED", "PYTHONDONTWRITEBYTECODE", "PYTHONUTF8",
         "PYTHONFAULTHANDLER", "LD_LIBRARY_PATH", "HF_HOME", "HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY",
         "TOKENIZERS_PARALLELISM", "XDG_CACHE_HOME", "GRADIO_ANALYTICS_ENABLED")
_KEEP_PREFIXES = ("LC_", "CUDA_", "NVIDIA_", "HIP_", "ROCR_", "ROCM_", "HSA_", "OMP_", "MKL_", "OPENBLAS_", "KMP_",
                  "GOMP_", "GGML_", "LLAMA_", "GPTQMODEL_", "TRANSFORMERS_", "TORCH_", "PYTORCH_", "EXLLAMA",
                  "COVERAGE_")
_SECRET_WORDS = ("TOKEN", "KEY", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "AUTH")


def worker_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a worker gets: see ``_KEEP``; never a name that looks like a secret."""
    source = os.environ if environ is None else environ
    kept = {}
    for name, value in source.items():
        if any(word in name.upper() for word in _SECRET_WORDS):
            continue
        if name in _KEEP or name.startswith(_KEEP_PREFIXES):
            kept[name] = value
    return kept


def exit_reason(returncode: int | None) -> str:
    """How a worker ended, in words: 'SIGSEGV, signal 11', 'exit status 3'."""
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"{signal.Signals(-returncode).name}, signal {-returncode}"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit status {returncode}"


class WorkerLink:
    """The socket to one worker's core (see the module's docstring)."""

    def __init__(self, process: subprocess.Popen, conn: Connection, *, name: str = "the model",
                 deadline: float = DEADLINE_S) -> None:
        self.process = process
        self._conn = conn
        self._name = name
        self.deadline = deadline
        self.handler: Callable[[dict[str, Any]], None] = lambda message: None
        # Called once, on the reader thread, when the worker dies unasked; what it returns ends the
        # line everyone waiting gets ("; reloading ...").
        self.on_exit: Callable[[str], str] = lambda reason: ""
        self.on_silent: Callable[[LoadstarError], None] = lambda error: None  # the deadline passed
        self.on_back: Callable[[], None] = lambda: None  # it answered again after that
        self.on_ended: Callable[[LoadstarError], None] = lambda error: None  # gone, asked or not
        self._heard = time.monotonic()
        self._silent_since: float | None = None  # set while not responding
        self._closing = False
        self._ended = threading.Event()
        self._outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        pid = process.pid
        self._writer = threading.Thread(target=self._write, name=f"loadstar-worker-{pid}-out", daemon=True)
        self._reader = threading.Thread(target=self._read, name=f"loadstar-worker-{pid}-in", daemon=True)
        self._watch = threading.Thread(target=self._watchdog, name=f"loadstar-worker-{pid}-watch", daemon=True)
        self._writer.start()
        self._reader.start()
        self._watch.start()

    # -- CoreLink ------------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def silent_for(self) -> float:
        return time.monotonic() - self._heard

    @property
    def responding(self) -> bool:
        return self._silent_since is None

    @property
    def problem(self) -> str | None:
        if self._silent_since is None or self._ended.is_set():
            return None
        return (f"{self._name}'s worker is not responding: nothing from it for {self.silent_for:.0f} s "
                f"(pid {self.pid}); Stop, Unload or Load ends it")

    def send(self, message: dict[str, Any]) -> None:
        if not self._ended.is_set():
            self._outbox.put(wire.encode(message))

    def end(self) -> None:
        """Ask the core to end and wait for the process; kill it when it is not responding, goes
        silent, or takes longer than ``EXIT_WAIT_S``."""
        self._closing = True
        if self.process.poll() is None:
            if not self.responding:
                log.warning("%s's worker is not responding: killed", self._name)
                self.process.kill()
            else:
                self.send({"op": "end"})
                started = time.monotonic()
                while self.process.poll() is None:
                    if self.silent_for > SILENT_GRACE_S + wire.BEAT_S or time.monotonic() - started > EXIT_WAIT_S:
                        log.warning("%s's worker did not end in time: killed", self._name)
                        self.process.kill()
                        break
                    time.sleep(0.05)
        self.process.wait()
        self._shutdown_socket()
        self._reader.join(timeout=EXIT_WAIT_S)

    def kill(self) -> None:
        self._closing = True
        self.process.kill()
        self.process.wait()
        self._shutdown_socket()

    # -- threads -------------------------------------------------------------------------------

    def _write(self) -> None:
        while True:
            data = self._outbox.get()
            if data is None:
                return
            try:
                self._conn.send_bytes(data)
            except (OSError, ValueError):
                return  # the reader sees the end

    def _read(self) -> None:
        try:
            while True:
                data = self._conn.recv_bytes(wire.MAX_MESSAGE_BYTES)
                self._heard = time.monotonic()
                if self._silent_since is not None:
                    log.warning("%s's worker answers again after %.0f s", self._name, self._heard - self._silent_since)
                    self._silent_since = None
                    self.on_back()
                self.handler(wire.decode(data))
        except (EOFError, OSError):
            pass
        except Exception as error:  # not the protocol (a hostile or broken worker): it is ended
            log.error("%s's worker sent a message that is not Loadstar's (%s): ended", self._name, error)
            self.process.kill()
        self._finish()

    def _finish(self) -> None:
        try:
            returncode = self.process.wait(timeout=EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            returncode = self.process.wait()
        self._outbox.put(None)
        if self._closing:
            reason = "the model was unloaded"
        else:
            reason = f"the model's worker crashed ({exit_reason(returncode)})"
            log.error("%s: %s", self._name, reason)
            try:
                reason += self.on_exit(reason)
            except Exception:
                log.exception("handling the worker's end failed")
        self._ended.set()
        self.on_ended(WorkerCrashed(reason))

    def _watchdog(self) -> None:
        while not self._ended.wait(0.5):
            if self._silent_since is None and self.silent_for > self.deadline and not self._closing:
                self._silent_since = self._heard
                line = self.problem or "the model's worker is not responding"
                log.error("%s", line)
                self.on_silent(WorkerNotResponding(line))

    def _shutdown_socket(self) -> None:
        try:  # a shutdown, not only a close: it wakes the reader blocked on this socket
            with socket.socket(fileno=os.dup(self._conn.fileno())) as same:
                same.shutdown(socket.SHUT_RDWR)
        except (OSError, ValueError):
            pass
        self._outbox.put(None)


def loader_data(loader: Any) -> dict[str, Any]:
    """A loader as plain data: its class (importable by the worker) and its attributes that are
    plain data (caches that are not stay behind; the worker's copy makes its own)."""
    cls = type(loader)
    if "<locals>" in cls.__qualname__ or cls.__module__ == "__main__":
        raise ModelLoadError(f"{getattr(loader, 'name', cls.__name__)} cannot run in a model worker: its class is not "
                             "importable by name; define it in a module, or start with --in-process-models")
    state = {}
    for name, value in vars(loader).items():
        try:
            if json.loads(json.dumps(value)) == value:
                state[name] = value
        except (TypeError, ValueError):
            continue
    return {"module": cls.__module__, "qualname": cls.__qualname__, "state": state}


def start_worker(
    loader: Any, folder: ModelFolder, options: Any, *, on_exit: Callable[[CoreClient, str], str],
    log_level: str = "INFO", cancel: threading.Event | None = None, deadline: float = DEADLINE_S,
) -> CoreClient:
    """Start a worker, load the model in it with ``loader``, and return its core's client.

    ``ModelLoadError`` if the load fails (the worker is ended then), the worker dies or goes
    silent while loading; setting ``cancel`` during the load ends the worker at once
    (``LoadCancelled``). ``on_exit`` is called if the loaded model's worker dies later."""
    described = loader_data(loader)
    mine, theirs = socket.socketpair()
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "loadstar.engine.models.worker_main", str(theirs.fileno()), log_level],
            pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, start_new_session=True, env=worker_env(),
        )
    finally:
        theirs.close()
    link = WorkerLink(process, Connection(mine.detach()), name=folder.name, deadline=deadline)
    loaded: Future = Future()

    def while_loading(message: dict[str, Any]) -> None:
        if message["op"] == "loaded":
            loaded.set_result(wire.read_facts(message.get("facts")))
        elif message["op"] == "load_failed":
            loaded.set_exception(wire.read_error(message.get("error")))
        elif message["op"] != "beat":
            raise wire.WireError(f"{message['op']!r} before the model is loaded")

    def fail(error: LoadstarError) -> None:
        if not loaded.done():
            try:
                loaded.set_exception(error)
            except Exception:  # InvalidStateError: it was set meanwhile
                pass

    link.handler = while_loading
    link.on_ended = link.on_silent = fail
    link.send({"op": "hello", "sys_path": list(sys.path)})  # plugins import there as they do here
    link.send({"op": "load", "loader": described, "folder": str(folder.path),
               "options": options.model_dump(mode="json")})
    try:
        while True:
            if cancel is not None and cancel.is_set():
                link.kill()
                raise LoadCancelled(f"loading {folder.name} was cancelled")
            try:
                facts = loaded.result(timeout=0.1)
                break
            except TimeoutError:
                continue
    except LoadCancelled:
        raise
    except WorkerCrashed as error:
        link.kill()
        raise ModelLoadError(f"{loader.name} could not load {folder.name}: {error} while loading it") from None
    except WorkerNotResponding:
        link.kill()
        raise ModelLoadError(f"{loader.name} could not load {folder.name}: its worker stopped responding "
                             f"(nothing for {deadline:.0f} s) while loading it") from None
    except BaseException:
        link.end()
        raise
    client = CoreClient(link, facts)
    link.on_silent = client.end_all
    link.on_back = client.resume
    link.on_ended = client.end_all
    # From now on a crash is the manager's to handle (a failed load is the caller's).
    link.on_exit = lambda reason: on_exit(client, reason)
    return client
