"""A model's engine core: the loop that owns the loaded model and its batch, next to the model.

One core per loaded model. It runs in the model's worker process (worker_main.py), or on a
thread of the server for ``--in-process-models`` and test models: the same class either way.
The server's side is its client (core_client.py); they speak the plain-data messages of wire.py.

The loop, as in vLLM's engine core or llama-server's slots: take every message that has come
(add a sequence, cancel one, answer a question: count tokens, cut a prompt, embed, a model
method), admit waiting sequences up to the model's ``max_batch``, run one step of the batch
(the next token of every decoding sequence and the next chunk of the prompts being read, see the
loader's ``DecodeBatch.step``), send what every sequence gained in one ``step`` message, again.
A question waits for at most one step, whatever the batch holds. With nothing to do the loop
sleeps on its inbox.

A model that does not batch (``max_batch`` 1) runs one sequence at a time with its
``stream_to``; between two of its tokens the core takes its messages the same way, so a
question is answered and a cancel lands at the next token.
"""

from __future__ import annotations

import logging
import queue
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


@dataclass
class _Sequence:
    key: int
    prompt: str
    params: SamplingParams
    seed: int
    output: OutputSpec | None


class EngineCore:
    """Serves ``model`` from ``inbox`` (messages, None to end) until told to end; ``send`` takes its output."""

    def __init__(self, model: LoadedModel, send: Send, inbox: queue.SimpleQueue[dict[str, Any] | None]) -> None:
        self._model = model
        self._send = send
        self._inbox = inbox
        self._limit = max(1, int(model.max_batch))
        self._batch: DecodeBatch | None = model.open_batch() if self._limit > 1 else None
        self._waiting: deque[_Sequence] = deque()
        self._running: set[int] = set()  # keys in the batch
        self._alone: tuple[int, CancelToken] | None = None  # the sequence a non-batching model runs now
        self._ended = False

    def run(self) -> None:
        """The loop (see the module's docstring); the model is unloaded when it ends."""
        try:
            while not self._ended:
                self._take_messages(block=not (self._running or self._waiting))
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
        while not self._ended:
            try:
                message = self._inbox.get(block=block)
            except queue.Empty:
                return
            block = False
            if message is None:
                self._end()
                return
            try:
                self._handle(message)
            except wire.WireError as error:
                log.error("a message the core cannot read: %s", error)

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
        if key in self._running:
            self._running.discard(key)
            assert self._batch is not None
            self._batch.remove(key)
        elif self._alone is not None and self._alone[0] == key:
            self._alone[1].cancel()

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

    def _step(self) -> None:
        assert self._batch is not None
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
            return
        for key, step in steps.items():
            if step.done:
                self._running.discard(key)
        if steps:
            try:
                self._send({"op": "step", "out": wire.steps_data(steps)})
            except wire.WireError as error:  # what the model gave is not plain data: those sequences end
                for key in steps:
                    if key in self._running:
                        self._running.discard(key)
                        self._batch.remove(key)
                    self._failed(key, WorkerError(f"the model's output: {error}"))

    def _run_alone(self, sequence: _Sequence) -> None:
        """A non-batching model's sequence: its tokens streamed, messages taken between them."""
        token = CancelToken()
        self._alone = (sequence.key, token)
        key = sequence.key
        unsent: list[wire.WireError] = []

        def emit(piece: StreamPiece) -> None:
            if not token.cancelled:
                try:
                    self._send({"op": "step", "out": [[key, wire.piece_data(piece), False]]})
                except wire.WireError as error:  # not plain data: the sequence ends with why
                    unsent.append(error)
                    token.cancel()
            self._take_messages(block=False)

        try:
            self._model.stream_to(sequence.prompt, sequence.params, token, seed=sequence.seed, emit=emit,
                                  **_output(sequence.output))
        except Exception as error:
            if not isinstance(error, BadRequestError):
                log.exception("sequence %s failed in the model", key)
            self._failed(key, error)
            return
        finally:
            self._alone = None
        if unsent:
            self._failed(key, WorkerError(f"the model's output: {unsent[0]}"))
            return
        if self._ended:
            return  # cut short by the end: the client ends it with why, not as a finished reply
        self._send({"op": "step", "out": [[key, None, True]]})

    def _failed(self, key: int, error: BaseException) -> None:
        self._send({"op": "failed", "key": key, "error": wire.error_data(error)})


def _output(output: OutputSpec | None) -> dict[str, OutputSpec]:
    # passed on only when given, so a model without the features never sees it
    return {"output": output} if output is not None and not output.plain else {}
