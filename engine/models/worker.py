"""The server's side of a model worker: a ``LoadedModel`` whose model lives in another process.

Native code (llama.cpp, CUDA kernels, a hostile GGUF's parser) can fault in ways no ``except``
catches; in a worker that costs the worker, not the server. ``start_worker`` starts
``python -m loadstar.engine.models.worker_main`` on one end of a socket pair, has it load the model
with the loader plugin, and returns a ``WorkerModel``: the engine uses it as any loaded model (its
batch is a ``WorkerBatch``), and every call goes over the socket to the worker's one model thread.
A reader thread here takes the worker's answers to whoever waits for them.

If the worker dies (a signal, an OOM kill, ``kill -9``), every call waiting on it and every later
one raises ``WorkerCrashed`` with one line ("the model's worker crashed (SIGSEGV, signal 11)"),
and ``on_exit`` is called once with that line: the model manager decides what comes next.
``unload`` closes the socket and waits for the process to end, so all its memory comes back.
"""

from __future__ import annotations

import itertools
import logging
import os
import pickle
import queue
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from multiprocessing.connection import Connection
from types import MappingProxyType
from typing import Any

from loadstar.engine.errors import ModelLoadError, WorkerCrashed, one_line
from loadstar.engine.models.folder import ModelFolder
from loadstar.engine.models.loader_api import (
    CancelToken,
    DecodeBatch,
    LoadedModel,
    OutputSpec,
    SequenceStep,
    StreamPiece,
    TextEmbedding,
)
from loadstar.engine.models.worker_main import BATCH, CALL, CANCEL, ERROR, FACTS, LOAD, PIECE, STREAM
from loadstar.engine.sampling import SamplingParams

log = logging.getLogger(__name__)

EXIT_WAIT_S = 30.0  # a worker asked to end gets this long before it is killed


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


class _Channel:
    """The socket to one worker: numbered calls, their answers, and the worker's end."""

    def __init__(self, process: subprocess.Popen, conn: Connection) -> None:
        self.process = process
        self._conn = conn
        # Called once, on the reader thread, when the worker dies unasked, before any caller hears of it; what it
        # returns ends the line the callers get ("; reloading ...").
        self.on_exit: Callable[[str], str] = lambda reason: ""
        self._ids = itertools.count(1)
        self._lock = threading.Lock()  # guards the pending map, the send and ``_dead``
        self._pending: dict[int, Future | queue.SimpleQueue] = {}
        self._dead: str | None = None
        self._closing = False
        self._reader = threading.Thread(target=self._read, name=f"loadstar-worker-{process.pid}", daemon=True)
        self._reader.start()

    def call(self, op: str, *args: Any) -> Any:
        future: Future = Future()
        self._send(op, args, future)
        return future.result()

    def stream(self, op: str, args: tuple, cancel: CancelToken) -> Iterator[Any]:
        """The pieces of a streamed call as they come; a cancel is passed on to the worker at once."""
        items: queue.SimpleQueue = queue.SimpleQueue()
        call_id = self._send(op, args, items)
        told = False
        while True:
            try:
                kind, payload = items.get(timeout=0.05)
            except queue.Empty:
                if cancel.cancelled and not told:
                    told = True
                    self._send_cancel(call_id)
                continue
            if kind == PIECE:
                yield payload
                if cancel.cancelled and not told:
                    told = True
                    self._send_cancel(call_id)
            elif kind == ERROR:
                raise payload
            else:
                return

    def _send(self, op: str, args: tuple, waiter: Future | queue.SimpleQueue) -> int:
        with self._lock:
            if self._dead is not None:
                raise WorkerCrashed(self._dead)
            call_id = next(self._ids)
            self._pending[call_id] = waiter
            try:
                self._conn.send((call_id, op, args))
            except (OSError, ValueError):
                self._pending.pop(call_id, None)
                raise WorkerCrashed(self._dead or "the model's worker is gone") from None
        return call_id

    def _send_cancel(self, call_id: int) -> None:
        with self._lock:
            if self._dead is None:
                try:
                    self._conn.send((0, CANCEL, (call_id,)))
                except (OSError, ValueError):
                    pass

    def _read(self) -> None:
        try:
            while True:
                call_id, kind, payload = self._conn.recv()
                with self._lock:
                    waiter = self._pending.get(call_id) if kind == PIECE else self._pending.pop(call_id, None)
                if waiter is None:
                    continue
                if isinstance(waiter, Future):
                    if kind == ERROR:
                        waiter.set_exception(payload)
                    else:
                        waiter.set_result(payload)
                else:
                    waiter.put((kind, payload))
        except (EOFError, OSError):
            pass
        except Exception:  # an answer that cannot be read: the channel is no use any more
            log.exception("reading from the model's worker failed")
            self.process.kill()
        self._ended()

    def _ended(self) -> None:
        try:
            returncode = self.process.wait(timeout=EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            returncode = self.process.wait()
        if self._closing:
            reason = "the model was unloaded"
        else:
            reason = f"the model's worker crashed ({exit_reason(returncode)})"
            log.error("%s", reason)
            try:
                reason += self.on_exit(reason)
            except Exception:
                log.exception("handling the worker's end failed")
        with self._lock:
            self._dead = reason
            waiting, self._pending = list(self._pending.values()), {}
        error = WorkerCrashed(reason)
        for waiter in waiting:
            if isinstance(waiter, Future):
                waiter.set_exception(error)
            else:
                waiter.put((ERROR, error))

    def close(self) -> None:
        """End the worker: close the socket (it exits on its own), then wait for it, killing it if it hangs."""
        self._closing = True
        try:  # a shutdown, not only a close: it wakes the reader blocked on this socket, and the worker sees EOF
            with socket.socket(fileno=os.dup(self._conn.fileno())) as same:
                same.shutdown(socket.SHUT_RDWR)
        except (OSError, ValueError):
            pass
        try:
            self._conn.close()
        except OSError:
            pass
        try:
            self.process.wait(timeout=EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            log.warning("the model's worker did not end in %.0f s: killed", EXIT_WAIT_S)
            self.process.kill()
            self.process.wait()
        self._reader.join(timeout=EXIT_WAIT_S)


class WorkerBatch:
    """The model's ``DecodeBatch`` in the worker. After a crash, ``remove`` and ``close`` do nothing
    (there is nothing left to remove from), so the engine's clean-up runs through."""

    def __init__(self, channel: _Channel) -> None:
        self._channel = channel

    def add(self, key: int, prompt: str, params: SamplingParams, *, seed: int, output: OutputSpec | None = None) -> None:
        extra = {"output": output} if output is not None else {}
        self._channel.call(BATCH, "add", (key, prompt, params), {"seed": seed, **extra})

    def step(self) -> dict[int, SequenceStep]:
        result: dict[int, SequenceStep] = self._channel.call(BATCH, "step", (), {})
        return result

    def remove(self, key: int) -> None:
        self._quietly("remove", key)

    def close(self) -> None:
        self._quietly("close")

    def _quietly(self, method: str, *args: Any) -> None:
        try:
            self._channel.call(BATCH, method, args, {})
        except WorkerCrashed:
            pass


class WorkerModel(LoadedModel):
    """A loaded model that lives in a worker process (see the module's docstring)."""

    def __init__(self, channel: _Channel, facts: dict[str, Any]) -> None:
        self._channel = channel
        for name in FACTS:
            setattr(self, name, facts[name])
        self.special_tokens = MappingProxyType(facts["special_tokens"])
        self._batch = WorkerBatch(channel)

    @property
    def pid(self) -> int:
        return self._channel.process.pid

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call a public method of the model in the worker (tests and benchmarks: ``encode``, ``clear_cache``)."""
        return self._channel.call(CALL, method, args, kwargs)

    def count_tokens(self, text: str) -> int:
        result: int = self.call("count_tokens", text)
        return result

    def fit_prompt(self, tokens: list[int], params: SamplingParams) -> list[int]:
        result: list[int] = self.call("fit_prompt", tokens, params)
        return result

    def stream(
        self, prompt: str, params: SamplingParams, cancel: CancelToken, *, seed: int, output: OutputSpec | None = None,
    ) -> Iterator[StreamPiece]:
        yield from self._channel.stream(STREAM, (prompt, params, seed, output), cancel)

    def stream_to(
        self, prompt: str, params: SamplingParams, cancel: CancelToken, *, seed: int,
        emit: Callable[[StreamPiece], None], output: OutputSpec | None = None,
    ) -> None:
        for piece in self.stream(prompt, params, cancel, seed=seed, output=output):
            emit(piece)

    def open_batch(self) -> DecodeBatch:
        return self._batch

    def embed(self, texts: list[str]) -> list[TextEmbedding]:
        result: list[TextEmbedding] = self.call("embed", texts)
        return result

    def unload(self) -> None:
        self._channel.close()


def start_worker(
    loader: Any, folder: ModelFolder, options: Any, *, on_exit: Callable[[WorkerModel, str], str],
    log_level: str = "INFO", cancel: threading.Event | None = None,
) -> WorkerModel:
    """Start a worker, load the model in it with ``loader``, and return it.

    ``ModelLoadError`` if the load fails (the worker is ended then) or the worker dies while loading;
    setting ``cancel`` during the load ends the worker at once (then ``WorkerCrashed``). ``on_exit``
    is called if the loaded model's worker dies later (see ``_Channel.on_exit``)."""
    mine, theirs = socket.socketpair()
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "loadstar.engine.models.worker_main", str(theirs.fileno()), log_level],
            pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
        )
    finally:
        theirs.close()
    conn = Connection(mine.detach())
    conn.send({"sys_path": list(sys.path)})  # plugins import in the worker as they do here
    channel = _Channel(process, conn)
    loading = threading.Event()
    if cancel is not None:
        def end_if_cancelled() -> None:
            while not loading.wait(0.1):
                if cancel.is_set():
                    process.kill()
                    return

        threading.Thread(target=end_if_cancelled, name="loadstar-load-cancel", daemon=True).start()
    try:
        facts = channel.call(LOAD, loader, folder, options)
    except (TypeError, AttributeError, pickle.PicklingError) as error:  # the loader object could not be sent
        channel.close()
        raise ModelLoadError(f"{loader.name} cannot run in a model worker ({one_line(error)}): its loader object "
                             "must pickle, or start with --in-process-models") from None
    except WorkerCrashed as error:
        channel.close()
        if cancel is not None and cancel.is_set():
            raise
        raise ModelLoadError(f"{loader.name} could not load {folder.name}: {error} while loading it") from None
    except BaseException:
        channel.close()
        raise
    finally:
        loading.set()
    model = WorkerModel(channel, facts)
    # From now on a crash is the manager's to handle (a failed load is the caller's).
    channel.on_exit = lambda reason: on_exit(model, reason)
    return model
