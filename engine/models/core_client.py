"""The server's side of a model's engine core: ``CoreClient``, a ``LoadedModel`` that sends and never waits on a step.

The generation scheduler adds sequences (``add``, with a sink that gets their steps) and cancels
them (``cancel``): both only send a message. Questions that need the model but not its batch
(``count_tokens``, ``fit_prompt``, ``embed``, ``call``) are answered by the core between two
steps. The model's facts (info, template, special tokens, ...) came with the load and are read
here without asking.

A link carries the messages: ``ThreadLink`` to a core on a thread of this process (this module:
``--in-process-models`` and test models), ``WorkerLink`` to a core in a worker process
(worker.py; it also watches the worker's heartbeat). When a link ends or its worker stops
responding, ``end_all`` ends every sequence and question with one line.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Protocol

from loadstar.engine.errors import LoadCancelled, LoadstarError, ModelLoadError, WorkerCrashed, one_line
from loadstar.engine.models import wire
from loadstar.engine.models.core import EngineCore
from loadstar.engine.models.loader_api import (
    CancelToken,
    LoadedModel,
    OutputSpec,
    SequenceStep,
    StreamPiece,
    TextEmbedding,
)
from loadstar.engine.sampling import SamplingParams

log = logging.getLogger(__name__)

EXIT_WAIT_S = 30.0  # a core asked to end gets this long

# What a sequence's sink gets, in order: its steps, or one error that ended it.
SeqItem = SequenceStep | LoadstarError
Sink = Callable[[list[tuple[int, SeqItem]]], None]


class CoreLink(Protocol):
    """How messages reach a core and come back (``handler`` gets each message from it)."""

    handler: Callable[[dict[str, Any]], None]

    def send(self, message: dict[str, Any]) -> None:
        """Hand a message to the core; never blocks on it."""

    def end(self) -> None:
        """Ask the core to end (it unloads its model) and wait for it; a worker that does not end is killed."""

    @property
    def pid(self) -> int | None:
        """The worker's process id (None: a core on a thread here)."""

    @property
    def problem(self) -> str | None:
        """One line while the core is not responding (a worker's deadline passed), else None."""


class CoreClient(LoadedModel):
    """A loaded model whose core runs elsewhere (a thread or a worker): see the module's docstring."""

    def __init__(self, link: CoreLink, facts: wire.ModelFacts, local: LoadedModel | None = None) -> None:
        self._link = link
        self.info = facts.info
        self.chat_template = facts.chat_template
        self.special_tokens = facts.special_tokens
        self.supported_params = facts.supported_params
        self.max_batch = facts.max_batch
        self.chat_rendered_by = facts.chat_rendered_by
        self.local = local  # the model object itself, for a core on a thread here (tests read it)
        self._lock = threading.Lock()  # guards the maps and ``_gone``
        self._sinks: dict[int, Sink] = {}
        self._answers: dict[int, Future] = {}
        self._ids = itertools.count(1)
        self._stream_keys = itertools.count(-1, -1)  # stream()'s own keys (the scheduler's are positive)
        self._gone: LoadstarError | None = None
        link.handler = self.receive

    # -- the link's side -----------------------------------------------------------------------

    def receive(self, message: dict[str, Any]) -> None:
        """One message from the core (``WireError`` when it is not one the protocol knows)."""
        op = message["op"]
        if op == "step":
            steps = wire.read_steps(message.get("out"))
            self._deliver(list(steps), [key for key, step in steps if step.done])
        elif op == "failed":
            key = wire.field_of(message, "key", int)
            self._deliver([(key, wire.read_error(message.get("error")))], [key])
        elif op == "answer":
            with self._lock:
                future = self._answers.pop(wire.field_of(message, "id", int), None)
            if future is not None:
                if "error" in message:
                    future.set_exception(wire.read_error(message["error"]))
                else:
                    future.set_result(message.get("result"))
        elif op != "beat":
            raise wire.WireError(f"unknown op {op!r}")

    def _deliver(self, items: list[tuple[int, SeqItem]], ended: list[int]) -> None:
        by_sink: dict[Sink, list[tuple[int, SeqItem]]] = {}
        with self._lock:
            for key, item in items:
                sink = self._sinks.get(key)
                if sink is not None:
                    by_sink.setdefault(sink, []).append((key, item))
            for key in ended:
                self._sinks.pop(key, None)
        for sink, mine in by_sink.items():
            sink(mine)

    def end_all(self, error: LoadstarError) -> None:
        """The core is gone or not responding: every sequence and question ends with ``error``, and so
        does every later call, until ``resume`` (a worker that answers again)."""
        with self._lock:
            self._gone = error
            sinks, self._sinks = self._sinks, {}
            answers, self._answers = self._answers, {}
        by_sink: dict[Sink, list[tuple[int, SeqItem]]] = {}
        for key, sink in sinks.items():
            by_sink.setdefault(sink, []).append((key, error))
            self._link.send({"op": "cancel", "key": key})  # a worker that answers again drops them
        for sink, mine in by_sink.items():
            sink(mine)
        for future in answers.values():
            future.set_exception(error)

    def resume(self) -> None:
        with self._lock:
            self._gone = None

    # -- the scheduler's side ------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._link.pid

    @property
    def problem(self) -> str | None:
        """One line while the model's worker is not responding, else None."""
        return self._link.problem

    def add(
        self, key: int, prompt: str, params: SamplingParams, *, seed: int, output: OutputSpec | None = None,
        sink: Sink,
    ) -> None:
        """Start a sequence in the core; its steps (or its error) go to ``sink``, from the link's thread."""
        with self._lock:
            if self._gone is not None:
                raise self._gone
            self._sinks[key] = sink
        self._link.send({"op": "add", "key": key, "prompt": prompt, "params": wire.params_data(params), "seed": seed,
                         "output": wire.output_data(output)})

    def cancel(self, key: int) -> None:
        """Drop a sequence (Stop, a stop string): nothing more comes to its sink."""
        with self._lock:
            known = self._sinks.pop(key, None) is not None
        if known:
            self._link.send({"op": "cancel", "key": key})

    def ask(self, method: str, *args: Any) -> Any:
        """A question to the core, answered between two of its steps (raises what it raised)."""
        future: Future = Future()
        with self._lock:
            if self._gone is not None:
                raise self._gone
            call_id = next(self._ids)
            self._answers[call_id] = future
        self._link.send({"op": "ask", "id": call_id, "method": method, "args": list(args)})
        while True:
            try:
                return future.result(timeout=1.0)
            except FutureTimeout:
                continue

    # -- LoadedModel ---------------------------------------------------------------------------

    def count_tokens(self, text: str) -> int:
        return int(self.ask("count_tokens", text))

    def count_many(self, texts: list[str]) -> list[int]:
        """``count_tokens`` of each text, in one question (the scheduler's requests joining together)."""
        return [int(n) for n in self.ask("count_many", list(texts))]

    def fit_prompt(self, tokens: list[int], params: SamplingParams) -> list[int]:
        return [int(t) for t in self.ask("fit_prompt", tokens, wire.params_data(params))]

    def embed(self, texts: list[str]) -> list[TextEmbedding]:
        return wire.read_embeddings(self.ask("embed", list(texts)))

    def call(self, method: str, *args: Any) -> Any:
        """A public method of the model, run by its core (tests and benchmarks: ``encode``, ``clear_cache``)."""
        return self.ask("call", method, list(args))

    def stream(
        self, prompt: str, params: SamplingParams, cancel: CancelToken, *, seed: int, output: OutputSpec | None = None,
    ) -> Iterator[StreamPiece]:
        """One sequence in the core's batch, outside the scheduler (an extension's ``generate`` hook)."""
        key = next(self._stream_keys)
        items: queue.SimpleQueue[list[tuple[int, SeqItem]]] = queue.SimpleQueue()
        self.add(key, prompt, params, seed=seed, output=output, sink=items.put)
        try:
            while True:
                try:
                    got = items.get(timeout=0.1)
                except queue.Empty:
                    if cancel.cancelled:
                        return
                    continue
                for _, item in got:
                    if isinstance(item, LoadstarError):
                        raise item
                    if item.piece is not None:
                        yield item.piece
                    if item.done:
                        return
                if cancel.cancelled:
                    return
        finally:
            self.cancel(key)

    def stream_to(
        self, prompt: str, params: SamplingParams, cancel: CancelToken, *, seed: int,
        emit: Callable[[StreamPiece], None], output: OutputSpec | None = None,
    ) -> None:
        for piece in self.stream(prompt, params, cancel, seed=seed, output=output):
            emit(piece)

    def unload(self, reason: str = "the model was unloaded") -> None:
        """End the core (it unloads the model; a worker ends, so all its memory comes back); its running
        requests end with ``reason`` (told first: the core's own end would tell them it was unloaded)."""
        self.end_all(WorkerCrashed(reason))
        self._link.end()


# -- a core on a thread of this process ----------------------------------------------------------

class ThreadLink:
    """A core on a thread here: messages are handed over as they are, no copy, no process."""

    def __init__(self) -> None:
        self.handler: Callable[[dict[str, Any]], None] = lambda message: None
        self.on_ended: Callable[[LoadstarError], None] = lambda error: None  # the core's loop ended
        self.inbox: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self.thread: threading.Thread | None = None

    def send(self, message: dict[str, Any]) -> None:
        self.inbox.put(message)

    def relay(self, message: dict[str, Any]) -> None:
        try:
            self.handler(message)
        except Exception:
            log.exception("handling the core's message failed")

    def end(self) -> None:
        self.inbox.put(None)
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout=EXIT_WAIT_S)
            if self.thread.is_alive():
                log.warning("the model's core did not end in %.0f s", EXIT_WAIT_S)

    @property
    def pid(self) -> int | None:
        return None

    @property
    def problem(self) -> str | None:
        return None


def serve_in_thread(model: LoadedModel, *, name: str = "loadstar-model") -> CoreClient:
    """A core for an already loaded ``model`` on a new thread here (tests, and loaders that run in the server)."""
    return _start_thread(lambda: model, name=name)


def load_in_thread(
    load: Callable[[], LoadedModel], *, cancel: threading.Event | None = None, name: str = "loadstar-model",
) -> CoreClient:
    """Run ``load`` on a new thread here and serve the model it returns from that thread (a torch
    model computes fastest on the thread that first computed with it). ``load``'s error is raised
    here; a cancelled load finishes (it cannot stop half-way), is unloaded, then ``LoadCancelled``."""
    client = _start_thread(load, name=name)
    if cancel is not None and cancel.is_set():
        client.unload()
        raise LoadCancelled(f"loading {client.info.name} was cancelled")
    return client


def _start_thread(load: Callable[[], LoadedModel], *, name: str) -> CoreClient:
    link = ThreadLink()
    ready: Future = Future()

    def run() -> None:
        try:
            model = load()
            if not isinstance(model, LoadedModel):
                raise ModelLoadError(f"the loader returned a {type(model).__name__}, not a loadstar.LoadedModel: "
                                     "its plugin needs updating")
            core = EngineCore(model, link.relay, link.inbox)
        except BaseException as error:
            ready.set_exception(error)
            return
        ready.set_result(model)
        try:
            core.run()
        except Exception as error:  # a bug in the loop: whoever waits hears of it, nobody hangs
            log.exception("the model's engine core failed")
            link.on_ended(WorkerCrashed(f"the model's engine core failed: {one_line(error)}"))
            return
        link.on_ended(WorkerCrashed("the model was unloaded"))

    link.thread = threading.Thread(target=run, name=name, daemon=True)
    link.thread.start()
    model = ready.result()
    client = CoreClient(link, wire.read_facts(wire.facts_data(model)), local=model)
    link.on_ended = client.end_all
    return client
