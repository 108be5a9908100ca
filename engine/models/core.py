"""A model's engine core: the loop that owns the loaded model and its batch, next to the model.

One core per loaded model. It runs in the model's worker process (worker_main.py), or on a
thread of the server for ``--in-process-models`` and test models: the same class either way.
The server's side is its client (core_client.py); they speak the plain-data messages of wire.py.

The loop, as in vLLM's engine core or llama-server's slots: take every message that has come
(add a sequence, cancel one, answer a question: count tokens, cut a prompt, embed, a model
method), admit waiting sequences up to the model's ``max_batch``, run one step of the batch
(the next token of every decoding sequence and the next chunk of the prompts being read, see the
loader's ``DecodeBatch.step``), send what every sequence gained in one ``step`` message, again.
A question waits for at most one step, whatever the batch holds; after a token count (a request's
prompt, counted before it is added) the loop waits ``ADD_FOLLOWS_S`` for the add. With nothing to
do the loop sleeps on its inbox.

A model that does not batch (``max_batch`` 1) runs one sequence at a time with its
``stream_to``; between two of its tokens the core takes its messages the same way, so a
question is answered and a cancel lands at the next token.

Steps are held together for up to ``stream_interval`` seconds (as vLLM's ``stream_interval``):
each message wakes three threads of the server and writes an HTTP chunk, on cores the model
needs, and a few tokens a message read as the same stream. A sequence's first text and its end
are sent at once; a step is held only when the next one will still come within the interval.
"""

from __future__ import annotations

import logging
import queue
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from loadstar.engine.errors import BadRequestError, WorkerError
from loadstar.engine.models import wire
from loadstar.engine.models.loader_api import CancelToken, DecodeBatch, LoadedModel, OutputSpec, StreamPiece
from loadstar.engine.sampling import SamplingParams

log = logging.getLogger(__name__)

Send = Callable[[dict[str, Any]], None]

STREAM_INTERVAL_S = 0.02  # how long a core may hold a sequence's text to send it with the next steps'
# After a token count the core waits this long for more messages before its next step: the server
# counts a request's prompt, then adds it, and an add that came a moment after the step began
# would wait a whole step (deep in a long prompt read alone, most of a second).
ADD_FOLLOWS_S = 0.01
COUNTS = ("count_tokens", "count_many")


@dataclass
class _Sequence:
    key: int
    prompt: str
    params: SamplingParams
    seed: int
    output: OutputSpec | None


class EngineCore:
    """Serves ``model`` from ``inbox`` (messages, None to end) until told to end; ``send`` takes its output."""

    def __init__(
        self, model: LoadedModel, send: Send, inbox: queue.SimpleQueue[dict[str, Any] | None], *,
        stream_interval: float = STREAM_INTERVAL_S, add_follows: float = ADD_FOLLOWS_S,
    ) -> None:
        self._model = model
        self._send = send
        self._inbox = inbox
        self._limit = max(1, int(model.max_batch))
        self._batch: DecodeBatch | None = model.open_batch() if self._limit > 1 else None
        self._waiting: deque[_Sequence] = deque()
        self._running: set[int] = set()  # keys in the batch
        self._alone: tuple[int, CancelToken] | None = None  # the sequence a non-batching model runs now
        self._ended = False
        self._interval = stream_interval
        self._add_follows = add_follows
        self._held: list[list[Any]] = []  # steps' [key, piece, done] not sent yet
        self._held_since = 0.0
        self._lost: set[int] = set()  # sequences ended because their output could not be sent
        self._fresh: set[int] = set()  # sequences in the batch whose first text has not come

    def run(self) -> None:
        """The loop (see the module's docstring); the model is unloaded when it ends."""
        try:
            while not self._ended:
                idle = not (self._running or self._waiting)
                if idle:
                    self._flush()
                self._take_messages(block=idle)
                if self._ended:
                    break
                if self._batch is not None:
                    self._admit()
                    if self._running:
                        self._step()
                elif self._waiting:
                    self._run_alone(self._waiting.popleft())
        finally:
            if self._batch is not None:
                try:
                    self._batch.close()
                except Exception:
                    log.exception("closing the batch failed")
            try:
                self._model.unload()
            except Exception:
                log.exception("unloading %s failed", self._model.info.name)

    # -- messages ------------------------------------------------------------------------------

    def _take_messages(self, *, block: bool) -> None:
        timeout: float | None = None  # blocking: as long as it takes
        while not self._ended:
            try:
                message = self._inbox.get(block=block, timeout=timeout)
            except queue.Empty:
                return
            block, timeout = False, None
            if message is None:
                self._end()
                return
            try:
                self._handle(message)
            except wire.WireError as error:
                log.error("a message the core cannot read: %s", error)
            if message.get("op") == "ask" and message.get("method") in COUNTS:
                block, timeout = True, self._add_follows  # the request's add follows (see ADD_FOLLOWS_S)

    def _handle(self, message: dict[str, Any]) -> None:
        op = message["op"]
        if op == "add":
            self._waiting.append(_Sequence(
                key=wire.field_of(message, "key", int), prompt=wire.field_of(message, "prompt", str),
                params=wire.read_params(message.get("params")), seed=wire.field_of(message, "seed", int),
                output=wire.read_output(message.get("output"))))
        elif op == "cancel":
            self._cancel(wire.field_of(message, "key", int))
        elif op == "ask":
            self._answer(wire.field_of(message, "id", int), wire.field_of(message, "method", str),
                         wire.field_of(message, "args", list))
        elif op == "end":
            self._end()
        else:
            raise wire.WireError(f"unknown op {op!r}")

    def _end(self) -> None:
        self._ended = True
        if self._alone is not None:
            self._alone[1].cancel()

    def _cancel(self, key: int) -> None:
        for sequence in self._waiting:
            if sequence.key == key:
                self._waiting.remove(sequence)
                return
        self._stop(key)

    def _answer(self, call_id: int, method: str, args: list[Any]) -> None:
        try:
            result = self._ask(method, args)
        except Exception as error:
            if not isinstance(error, (BadRequestError, WorkerError)):
                log.exception("answering %s failed", method)
            self._send({"op": "answer", "id": call_id, "error": wire.error_data(error)})
            return
        try:
            self._send({"op": "answer", "id": call_id, "result": result})
        except wire.WireError as error:  # (a worker's send encodes) a NaN in an embedding, an object
            self._send({"op": "answer", "id": call_id, "error": wire.error_data(WorkerError(f"{method}: {error}"))})

    def _ask(self, method: str, args: list[Any]) -> Any:
        model = self._model
        if method == "count_tokens":
            return model.count_tokens(str(args[0]))
        if method == "count_many":
            return [model.count_tokens(str(text)) for text in args[0]]
        if method == "fit_prompt":
            return model.fit_prompt([int(t) for t in args[0]], wire.read_params(args[1]))
        if method == "embed":
            return wire.embeddings_data(model.embed([str(t) for t in args[0]]))
        if method == "call":  # a public method of the model (tests and benchmarks: encode, clear_cache)
            name, call_args = str(args[0]), args[1]
            if name.startswith("_") or not isinstance(call_args, list):
                raise WorkerError(f"{name} is not part of a model's interface")
            return getattr(model, name)(*call_args)
        raise WorkerError(f"unknown question {method!r}")

    # -- generation ----------------------------------------------------------------------------

    def _admit(self) -> None:
        assert self._batch is not None
        while self._waiting and len(self._running) < self._limit:
            sequence = self._waiting.popleft()
            try:
                self._batch.add(sequence.key, sequence.prompt, sequence.params, seed=sequence.seed,
                                **_output(sequence.output))
            except Exception as error:
                if not isinstance(error, BadRequestError):
                    log.exception("sequence %s could not join the batch", sequence.key)
                self._failed(sequence.key, error)
                continue
            self._running.add(sequence.key)
            self._fresh.add(sequence.key)

    def _step(self) -> None:
        assert self._batch is not None
        started = time.monotonic()
        try:
            steps = self._batch.step()
        except Exception as error:
            log.exception("a batched step failed")
            for key in list(self._running):
                try:
                    self._batch.remove(key)
                except Exception:
                    log.exception("removing sequence %s failed", key)
                self._failed(key, error)
            self._running.clear()
            self._fresh.clear()
            return
        for key, step in steps.items():
            if step.done:
                self._running.discard(key)
        if steps:
            self._hold([wire.step_data(key, step) for key, step in steps.items()],
                       urgent=any(step.done or key in self._fresh for key, step in steps.items()),
                       step_s=time.monotonic() - started)
            self._fresh.difference_update(key for key, step in steps.items() if step.piece is not None or step.done)

    def _run_alone(self, sequence: _Sequence) -> None:
        """A non-batching model's sequence: its tokens streamed, messages taken between them."""
        token = CancelToken()
        self._alone = (sequence.key, token)
        key = sequence.key
        last, first = time.monotonic(), True

        def emit(piece: StreamPiece) -> None:
            nonlocal last, first
            if not token.cancelled:
                now = time.monotonic()
                self._hold([[key, wire.piece_data(piece), False]], urgent=first, step_s=now - last)
                last, first = now, False
            self._take_messages(block=False)

        try:
            self._model.stream_to(sequence.prompt, sequence.params, token, seed=sequence.seed, emit=emit,
                                  **_output(sequence.output))
        except Exception as error:
            if not isinstance(error, BadRequestError):
                log.exception("sequence %s failed in the model", key)
            if key not in self._lost:
                self._failed(key, error)
            return
        finally:
            self._alone = None
            lost = key in self._lost
            self._lost.discard(key)
        if self._ended or lost:
            return  # cut short by the end (the client ends it with why, not as a finished reply), or told
        self._hold([[key, None, True]], urgent=True, step_s=0.0)

    # -- sending -------------------------------------------------------------------------------

    def _hold(self, entries: list[list[Any]], *, urgent: bool, step_s: float) -> None:
        """Send a step's ``entries`` ([key, piece, done]) with the held ones, now when ``urgent`` or
        when the next step (taking about ``step_s``) would come after the interval, else later."""
        now = time.monotonic()
        if not self._held:
            self._held_since = now
        self._held.extend(entries)
        if urgent or now - self._held_since + step_s >= self._interval:
            self._flush()

    def _flush(self) -> None:
        if not self._held:
            return
        held, self._held = self._held, []
        try:
            self._send({"op": "step", "out": held})
        except wire.WireError:  # what a model gave is not plain data: that sequence ends, the others go on
            for key in dict.fromkeys(entry[0] for entry in held):
                try:
                    self._send({"op": "step", "out": [entry for entry in held if entry[0] == key]})
                except wire.WireError as error:
                    self._stop(key, lost=True)
                    self._failed(key, WorkerError(f"the model's output: {error}"))

    def _stop(self, key: int, *, lost: bool = False) -> None:
        """Take ``key`` out of the batch, or stop it where it runs alone (``lost``: its end was told already)."""
        if key in self._running:
            self._running.discard(key)
            self._fresh.discard(key)
            assert self._batch is not None
            self._batch.remove(key)
        elif self._alone is not None and self._alone[0] == key:
            if lost:
                self._lost.add(key)
            self._alone[1].cancel()

    def _failed(self, key: int, error: BaseException) -> None:
        self._flush()  # what it made goes first
        self._send({"op": "failed", "key": key, "error": wire.error_data(error)})


def _output(output: OutputSpec | None) -> dict[str, OutputSpec]:
    # passed on only when given, so a model without the features never sees it
    return {"output": output} if output is not None and not output.plain else {}
