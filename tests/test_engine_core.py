"""The engine core's boundary with fake models: questions between steps, one load per model, plain-data
messages, what a worker inherits. The real default model's latencies are in test_serving_core.py."""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path

import pytest

from loadstar.engine.chat.messages import ChatMessage
from loadstar.engine.generation.requests import GenerationRequest, TextDelta
from loadstar.engine.models import wire
from loadstar.engine.models.worker import WorkerLink, worker_env
from loadstar.engine.sampling import SamplingParams
from tests.fakes import FakeBatchModel, FakeLoader, engine_with
from tests.folders import hf_folder


class BatchLoader(FakeLoader):
    def load(self, folder, options):
        model = FakeBatchModel(max_batch=2, delay=0.05, reply=" ".join(["word"] * 200), name=folder.name)
        self.loaded.append(model)
        return model


def streaming(engine, owner="a"):
    handle = engine.submit(GenerationRequest(prompt="go", owner=owner, params=SamplingParams(max_new_tokens=200)))
    next(e for e in handle.events() if isinstance(e, TextDelta))
    return handle


def within(seconds, fn, *args):
    """``fn(*args)`` on a thread; its result, or a failure when it takes longer than ``seconds``."""
    box = {}
    thread = threading.Thread(target=lambda: box.update(result=fn(*args)), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{getattr(fn, '__name__', fn)} did not answer in {seconds} s"
    return box["result"]


def test_questions_are_answered_between_steps_while_a_batch_runs(tmp_path):
    """preview, count_tokens and prompt_room used to take the manager's use-lock and wait for the model
    thread, which waited for that lock inside the running batch: a deadlock for good."""
    engine = engine_with(tmp_path, BatchLoader("Batch"))
    hf_folder(engine.settings.models_dir, "batchy")
    engine.load_model("batchy")
    running = streaming(engine)
    request = GenerationRequest(messages=(ChatMessage(role="user", content="how many tokens"),))
    assert within(30, engine.count_tokens, ["one two three"]) == [3]
    assert "how many tokens" in within(30, engine.preview, request).prompt
    room, prepared = within(30, engine.prompt_room, request)
    assert room is not None and room < 100 and prepared.prompt_tokens > 0
    assert running.finished is None  # all of that while the batch ran
    running.cancel()
    assert running.result().reason == "cancelled"


def test_two_requests_for_one_unloaded_model_load_it_once(tmp_path):
    loader = FakeLoader("Slow", load_seconds=1.0)
    engine = engine_with(tmp_path, loader, max_models=2)
    hf_folder(engine.settings.models_dir, "wanted")
    results = []
    threads = [threading.Thread(target=lambda: results.append(engine.ensure_loaded("wanted").name)) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == ["wanted"] * 3
    assert len(loader.loaded) == 1  # one load for the three requests


def test_two_resident_models_answer_in_their_own_lanes(tmp_path):
    """A full batch on one model does not hold up a request for the other."""
    engine = engine_with(tmp_path, BatchLoader("Batch"), max_models=2)
    for name in ("first", "second"):
        hf_folder(engine.settings.models_dir, name)
    engine.load_model("first")
    engine.ensure_loaded("second")
    busy = [streaming(engine, owner) for owner in "ab"]  # the first model's batch of 2 is full
    waiting = engine.submit(GenerationRequest(prompt="go", owner="c", params=SamplingParams(max_new_tokens=200)))
    other = engine.submit(GenerationRequest(prompt="x", owner="d", model="second",
                                            params=SamplingParams(max_new_tokens=3)))
    done = other.result()
    assert done.error is None and done.text == "word word word "
    assert all(h.finished is None for h in busy) and waiting.finished is None
    for handle in [*busy, waiting]:
        handle.cancel()


def test_a_message_that_is_a_pickle_is_refused_and_never_unpickled(tmp_path):
    """A worker that sends a pickle (what code run by a hostile model file could do) is ended; the
    server never unpickles it, so the pickle's payload never runs here."""
    marker = tmp_path / "owned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    assert not marker.exists()
    with pytest.raises(wire.WireError):
        wire.decode(pickle.dumps(Payload()))
    mine, theirs = socket.socketpair()
    child = (f"import sys, time; from multiprocessing.connection import Connection; "
             f"c = Connection({theirs.fileno()}); c.send_bytes(bytes.fromhex(sys.argv[1])); time.sleep(60)")
    process = subprocess.Popen([sys.executable, "-c", child, pickle.dumps(Payload()).hex()], pass_fds=(theirs.fileno(),))
    theirs.close()
    heard = []
    link = WorkerLink(process, Connection(mine.detach()), name="hostile")
    ended = threading.Event()
    link.handler = heard.append
    link.on_ended = lambda error: ended.set()
    assert ended.wait(30)
    assert process.poll() is not None  # ended by the server
    assert heard == [] and not marker.exists()


def test_a_worker_gets_no_secrets_and_a_session_of_its_own(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    monkeypatch.setenv("LOADSTAR_API_KEY", "key-secret-value")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-value")
    kept = worker_env()
    assert {"HF_TOKEN", "LOADSTAR_API_KEY", "OPENAI_API_KEY"}.isdisjoint(kept) and kept["PATH"] == os.environ["PATH"]
    engine = engine_with(tmp_path, FakeLoader("Fake"), model_workers=True)
    hf_folder(engine.settings.models_dir, "isolated")
    engine.load_model("isolated")
    with engine.models.use() as model:
        pid = model.pid
    environ = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    assert "secret-value" not in environ and "hf_secret" not in environ
    assert os.getsid(pid) != os.getsid(0)  # Ctrl+C in the server's terminal never reaches it
    assert engine.submit(GenerationRequest(prompt="still answers")).result().text == "still answers "


def test_a_frozen_worker_is_reported_its_requests_end_and_unload_kills_it(tmp_path):
    """SIGSTOP on a fake model's worker (a hung driver, a swapped-out process): after the deadline it is
    reported, its stream ends with one line, and Unload kills it at once."""
    import signal

    engine = engine_with(tmp_path, BatchLoader("Batch"), model_workers=True, worker_deadline=3)
    hf_folder(engine.settings.models_dir, "frozen")
    engine.load_model("frozen")
    handle = streaming(engine)
    with engine.models.use() as model:
        pid = model.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        finished = handle.result()
        assert time.monotonic() - started < 20
        assert finished.reason == "error" and "frozen's worker is not responding" in finished.error
        assert "\n" not in finished.error
        assert "not responding" in (engine.model_problem or "")
        started = time.monotonic()
        assert engine.unload_model()
        assert time.monotonic() - started < 10
        assert subprocess.run(["kill", "-0", str(pid)], capture_output=True).returncode != 0  # gone
        assert engine.model_problem is None
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


class NaNLoader(FakeLoader):
    """A model whose output is not plain data (a token count of NaN): JSON cannot carry it."""

    def load(self, folder, options):
        from loadstar import StreamPiece

        model = FakeBatchModel(name=folder.name)  # its stream is what is replaced; it runs alone
        model.max_batch = 1
        model.stream = lambda prompt, params, cancel, *, seed: iter([StreamPiece("x ", float("nan"))])
        return model


def test_output_that_is_not_plain_data_ends_the_request_not_the_worker(tmp_path):
    engine = engine_with(tmp_path, NaNLoader("NaN"), model_workers=True)
    hf_folder(engine.settings.models_dir, "odd")
    engine.load_model("odd")
    with engine.models.use() as model:
        pid = model.pid
    for _ in range(2):
        done = engine.submit(GenerationRequest(prompt="go")).result()
        assert done.reason == "error" and "not plain data" in done.error and "\n" not in done.error
    with engine.models.use() as model:
        assert model.pid == pid and engine.model_problem is None  # the same worker, never taken for crashed


def _core_messages(model, interval, words):
    """Run one sequence of ``words`` tokens through an engine core on a thread; the core's step messages."""
    import queue

    from loadstar.engine.models.core import EngineCore

    sent, inbox = [], queue.SimpleQueue()
    core = threading.Thread(target=EngineCore(model, sent.append, inbox, stream_interval=interval).run, daemon=True)
    core.start()
    inbox.put({"op": "add", "key": 7, "prompt": "go", "params": wire.params_data(SamplingParams(max_new_tokens=words)),
               "seed": 0, "output": None})
    deadline = time.monotonic() + 60
    while not any(entry[2] for m in list(sent) if m["op"] == "step" for entry in m["out"]):
        assert time.monotonic() < deadline, "the sequence did not end"
        time.sleep(0.01)
    inbox.put(None)
    core.join(30)
    return [m["out"] for m in sent if m["op"] == "step"]


@pytest.mark.parametrize("kind", ["batch", "alone"])
def test_a_core_sends_steps_together_but_first_text_and_end_at_once(kind):
    reply = " ".join(f"w{i}" for i in range(60))

    def model(delay):
        if kind == "batch":
            return FakeBatchModel(max_batch=2, delay=delay, reply=reply)
        from tests.fakes import FakeModel
        return FakeModel(reply=reply, delay=delay)

    fast = _core_messages(model(0.001), 0.05, 60)  # ~1 ms a token, 50 ms a message at most
    entries = [entry for message in fast for entry in message]
    assert "".join(e[1]["text"] for e in entries if e[1]) == reply + " "  # every piece, in order
    assert [e[0] for e in entries] == [7] * len(entries)
    assert len(fast[0]) == 1 and fast[0][0][1]["text"] == "w0 "  # the first text went alone, at once
    assert fast[-1][-1][2] and len(fast) < 20  # held together: far fewer messages than 60 tokens
    # without a hold, or with steps slower than it, every step is its own message
    assert len(_core_messages(model(0.001), 0.0, 60)) == len(_core_messages(model(0.03), 0.02, 60))
    assert len(_core_messages(model(0.001), 0.0, 20)) >= 20


def test_a_request_counted_between_steps_joins_the_next_step():
    """The server counts a prompt's tokens (a question, answered between two steps), then adds it; an
    add that came a moment after the next step began used to wait that whole step (most of a second
    deep in a long prompt read alone, on a slow CPU)."""
    import queue

    from loadstar.engine.models.core import EngineCore

    sent, inbox = [], queue.SimpleQueue()
    model = FakeBatchModel(max_batch=2, delay=0.3, reply=" ".join(["word"] * 50))  # 0.3 s a step
    # a wide window here: the mechanism, not this machine's thread wake-ups (the server answers within ms)
    core = threading.Thread(target=EngineCore(model, sent.append, inbox, stream_interval=0.0, add_follows=0.2).run,
                            daemon=True)
    core.start()

    def add(key):
        inbox.put({"op": "add", "key": key, "prompt": "go", "seed": 0, "output": None,
                   "params": wire.params_data(SamplingParams(max_new_tokens=50))})

    def wait_for(what, condition):
        deadline = time.monotonic() + 30
        while not condition():
            assert time.monotonic() < deadline, what
            time.sleep(0.001)

    try:
        add(1)
        wait_for("the first sequence's text", lambda: any(m["op"] == "step" for m in list(sent)))
        inbox.put({"op": "ask", "id": 5, "method": "count_tokens", "args": ["how many tokens"]})
        wait_for("the count", lambda: any(m["op"] == "answer" for m in list(sent)))
        answered = next(i for i, m in enumerate(list(sent)) if m["op"] == "answer")
        time.sleep(0.01)  # the server's turn: the answer read, the request started, its add sent
        add(2)
        wait_for("the second sequence's text",
                 lambda: any(e[0] == 2 for m in list(sent) if m["op"] == "step" for e in m["out"]))
        steps = [m for m in list(sent)[answered + 1:] if m["op"] == "step"]
        assert any(e[0] == 2 for e in steps[0]["out"]), "the added sequence missed the step after its count"
    finally:
        inbox.put(None)
        core.join(30)
