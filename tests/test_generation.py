import threading
import time
from contextlib import contextmanager

import pytest

from loadstar.engine.chat.messages import ChatMessage
from loadstar.engine.errors import BadRequestError
from loadstar.engine.generation.requests import Finished, GenerationRequest, Queued, Started, TextDelta
from loadstar.engine.generation.service import GenerationService
from loadstar.engine.models.core_client import serve_in_thread
from loadstar.engine.models.loader_api import StreamPiece
from loadstar.engine.sampling import SamplingParams
from tests.fakes import FakeModel


class Slot:
    """One model, served by an engine core on a thread here (as ``--in-process-models`` does)."""

    def __init__(self, model):
        self.model = model
        self.client = serve_in_thread(model) if model is not None else None

    @contextmanager
    def use(self, name=None):
        yield self.client if self.resolve(name) else None

    def resolve(self, name):
        here = self.model.info.name if self.model is not None else None
        return here if name in (None, here) else None


@pytest.fixture
def service_for():
    services = []

    def make(model):
        slot = Slot(model)
        service = GenerationService(slot)
        services.append((service, slot))
        return service

    yield make
    for service, slot in services:
        service.close()
        if slot.client is not None:
            slot.client.unload()


def prompt_request(prompt, owner="a", **params):
    return GenerationRequest(prompt=prompt, owner=owner, params=SamplingParams(**params))


def test_streams_events_in_order(service_for):
    service = service_for(FakeModel(reply="one two three"))
    events = list(service.submit(prompt_request("hi", seed=7)).events())
    assert isinstance(events[0], Queued) and events[0].position == 1
    started = next(e for e in events if isinstance(e, Started))
    assert started.seed == 7 and started.prompt == "hi" and started.prompt_tokens == 1
    deltas = [e.text for e in events if isinstance(e, TextDelta)]
    assert deltas == ["one ", "two ", "three "]
    final = events[-1]
    assert isinstance(final, Finished)
    assert (final.reason, final.text, final.completion_tokens) == ("stop", "one two three ", 3)


def test_chat_messages_go_through_the_models_template(service_for):
    service = service_for(FakeModel())
    request = GenerationRequest(messages=(ChatMessage(role="user", content="hello"),))
    assert service.submit(request).result().text == "<user>hello<assistant> "


def test_max_new_tokens_gives_reason_length(service_for):
    service = service_for(FakeModel(reply="a b c d e"))
    result = service.submit(prompt_request("x", max_new_tokens=2)).result()
    assert (result.reason, result.text) == ("length", "a b ")


def test_random_seed_is_drawn_and_reported(service_for):
    model = FakeModel(reply="a")
    service = service_for(model)
    result = service.submit(prompt_request("x", seed=-1)).result()
    assert result.seed is not None and result.seed >= 0 and model.seeds == [result.seed]


def test_cancel_running_request_stops_it(service_for):
    model = FakeModel(reply=" ".join(["word"] * 1000), delay=0.005)
    service = service_for(model)
    handle = service.submit(prompt_request("x", max_new_tokens=1000))
    assert model.started.wait(5)
    handle.cancel()
    result = handle.result()
    assert result.reason == "cancelled"
    assert result.completion_tokens < 1000


def test_two_concurrent_requests_never_interleave(service_for):
    service = service_for(FakeModel(delay=0.002))
    first_words = " ".join(f"a{i}" for i in range(50))
    second_words = " ".join(f"b{i}" for i in range(50))
    results = {}

    def run(name, prompt, owner):
        results[name] = service.submit(prompt_request(prompt, owner=owner)).result().text

    threads = [threading.Thread(target=run, args=("a", first_words, "alice")),
               threading.Thread(target=run, args=("b", second_words, "bob"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results["a"].split() == first_words.split()
    assert results["b"].split() == second_words.split()


def test_stop_cancels_only_the_owners_requests(service_for):
    model = FakeModel(reply=" ".join(["w"] * 200), delay=0.005)
    service = service_for(model)
    alice = service.submit(prompt_request("x", owner="alice", max_new_tokens=200))
    assert model.started.wait(5)
    bob = service.submit(prompt_request("x", owner="bob", max_new_tokens=20))
    assert service.cancel_owner("alice") == 1
    assert alice.result().reason == "cancelled"
    bob_result = bob.result()
    assert bob_result.reason == "length" and bob_result.completion_tokens == 20


def test_cancelling_a_waiting_request_removes_it_and_updates_positions(service_for):
    model = FakeModel(reply=" ".join(["w"] * 100), delay=0.005)
    service = service_for(model)
    running = service.submit(prompt_request("x", owner="a", max_new_tokens=100))
    assert model.started.wait(5)
    second = service.submit(prompt_request("x", owner="b"))
    third = service.submit(prompt_request("x", owner="c"))
    second.cancel()
    assert second.result().reason == "cancelled"
    positions = []
    for event in third.events():
        if isinstance(event, Queued):
            positions.append(event.position)
    assert positions[:2] == [2, 1]
    running.cancel()


def test_positions_reflect_round_robin(service_for):
    model = FakeModel(reply="w", delay=0.05)
    service = service_for(model)
    blocker = service.submit(prompt_request("x", owner="z"))
    assert model.started.wait(5)
    a1 = service.submit(prompt_request("a1", owner="a"))
    a2 = service.submit(prompt_request("a2", owner="a"))
    b1 = service.submit(prompt_request("b1", owner="b"))
    first_position = {name: next(e.position for e in h.events() if isinstance(e, Queued))
                      for name, h in (("a1", a1), ("a2", a2), ("b1", b1))}
    # b1 arrived last but overtakes a's second request
    assert first_position == {"a1": 1, "a2": 2, "b1": 2}
    finish_order = []
    lock = threading.Lock()

    def wait(name, handle):
        handle.result()
        with lock:
            finish_order.append(name)

    threads = [threading.Thread(target=wait, args=(n, h)) for n, h in (("a1", a1), ("a2", a2), ("b1", b1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    blocker.result()
    assert finish_order == ["a1", "b1", "a2"]


def test_model_error_finishes_with_error_and_the_worker_survives(service_for):
    broken = FakeModel(reply="a b c d", fail_after=2)
    service = service_for(broken)
    failed = service.submit(prompt_request("x")).result()
    assert failed.reason == "error" and failed.error == "RuntimeError: the fake model broke"
    assert failed.text == "a b "  # what came before the error is kept
    broken.fail_after = None
    assert service.submit(prompt_request("x")).result().reason == "stop"


def test_no_model_loaded_is_a_clear_error(service_for):
    service = service_for(None)
    result = service.submit(prompt_request("x")).result()
    assert result.reason == "error" and "no model is loaded" in result.error


@pytest.mark.parametrize("kwargs", [{}, {"prompt": ""}, {"prompt": "x", "messages": (ChatMessage(role="user", content="y"),)}])
def test_malformed_requests_are_rejected(kwargs):
    with pytest.raises(BadRequestError):
        GenerationRequest(**kwargs)


def test_close_cancels_pending_work(service_for):
    model = FakeModel(reply=" ".join(["w"] * 500), delay=0.01)
    service = service_for(model)
    running = service.submit(prompt_request("x", max_new_tokens=500))
    waiting = service.submit(prompt_request("y", owner="b"))
    assert model.started.wait(5)
    started = time.monotonic()
    service.close()
    assert running.result().reason == "cancelled" and waiting.result().reason == "cancelled"
    assert time.monotonic() - started < 5
    with pytest.raises(BadRequestError):
        service.submit(prompt_request("z"))


class NoTemplateModel(FakeModel):
    chat_template = None


def test_a_chat_with_no_known_format_carries_the_notice(service_for):
    """Sent as plain text only with the notice: never silently."""
    service = service_for(NoTemplateModel(reply="Paris"))
    events = list(service.submit(GenerationRequest(messages=(ChatMessage(role="user", content="hi"),))).events())
    started = next(e for e in events if isinstance(e, Started))
    assert "no chat format known for this model: pick one in Parameters" in started.notices
    assert started.format_name == "Completion" and "pick one in Parameters" in started.format_why
    assert "no chat format known for this model: pick one in Parameters" in events[-1].notices


@pytest.mark.parametrize(("reply", "stop", "max_new_tokens", "reason"), [
    ("", (), 10, "the model ended it at its first token"),
    ("END and more", ("END",), 10, "the stop string 'END' came first"),
    ("\n \n \n", (), 3, "max_new_tokens (3) ran out before any visible text"),
])
def test_an_empty_reply_always_says_why(service_for, reply, stop, max_new_tokens, reason):
    model = FakeModel(reply=reply)
    model.stream = lambda prompt, params, cancel, *, seed: iter(
        [StreamPiece(p, 1) for p in (["END", " and more"] if stop else reply.split(" ") if reply else [])][:max_new_tokens]
    )
    service = service_for(model)
    result = service.submit(GenerationRequest(prompt="q", stop=stop,
                                              params=SamplingParams(max_new_tokens=max_new_tokens))).result()
    assert result.text.strip() == ""
    assert any(reason in n for n in result.notices), result.notices


# -- continuous batching (a fake model that batches; the real one is in test_llamacpp.py) ----------

def test_requests_join_a_running_batch_in_fair_order_up_to_its_size(service_for):
    from tests.fakes import FakeBatchModel

    model = FakeBatchModel(max_batch=2, delay=0.03)
    service = service_for(model)
    long = service.submit(prompt_request("w " * 40, owner="a"))  # runs until the others are done
    short = service.submit(prompt_request("v " * 8, owner="d"))
    for event in long.events():
        if isinstance(event, TextDelta):
            break
    a2 = service.submit(prompt_request("x " * 3, owner="a"))  # the batch is full: these wait
    b1 = service.submit(prompt_request("y " * 3, owner="b"))
    c1 = service.submit(prompt_request("z " * 3, owner="c"))
    events = {h: list(h.events()) for h in (a2, b1, c1)}
    results = [long.result(), short.result(), *(events[h][-1] for h in (a2, b1, c1))]
    assert [r.text for r in results] == ["w " * 40, "v " * 8, "x " * 3, "y " * 3, "z " * 3]
    # The positions shown follow the rule the joining follows: when c arrives (short still runs),
    # the line is b, c, then a's second (a already has a request in the batch).
    shown = {h: [e.position for e in events[h] if isinstance(e, Queued)] for h in (a2, b1, c1)}
    assert shown[c1][0] == 2 and shown[b1][0] == 1 and shown[a2][:3] == [1, 2, 3], shown
    assert max(len(keys) for keys in model.steps) == 2  # never more than max_batch
    joined = {h: next(i for i, keys in enumerate(model.steps) if h.id in keys) for h in (long, short, a2, b1, c1)}
    # b joins the running batch first when short leaves: a already has a request running, so a's
    # second waits although it came first
    assert joined[short] < joined[b1] and long.id in model.steps[joined[b1]]
    assert joined[b1] < joined[a2] and joined[c1] <= joined[a2]


def test_stopping_one_sequence_of_a_batch_leaves_the_others(service_for):
    from tests.fakes import FakeBatchModel

    model = FakeBatchModel(max_batch=3, delay=0.02)
    service = service_for(model)
    handles = [service.submit(prompt_request(f"{n} " * 8, owner=n)) for n in "abc"]
    for event in handles[1].events():
        if isinstance(event, TextDelta):
            handles[1].cancel()
            break
    assert handles[1].result().reason == "cancelled"
    assert [handles[i].result().text for i in (0, 2)] == ["a " * 8, "c " * 8]
    assert handles[1].id not in model.steps[-1]


def test_a_replaced_model_lets_its_batch_drain_and_takes_no_more(service_for):
    from tests.fakes import FakeBatchModel

    model = FakeBatchModel(max_batch=4, delay=0.02)
    service = service_for(model)
    slot = service._slot
    first = service.submit(prompt_request("w " * 5))
    for event in first.events():
        if isinstance(event, TextDelta):
            break
    slot.serves = lambda client: False  # replaced by a new load: its requests end, nobody joins
    later = service.submit(prompt_request("x " * 2, owner="b"))
    assert first.result().text == "w " * 5
    time.sleep(0.3)
    assert later.finished is None and all(later.id not in keys for keys in model.steps)
    slot.serves = lambda client: True  # (the manager's use() then gives the new model)
    assert later.result().text == "x " * 2


def test_a_prompt_the_batch_refuses_ends_alone_with_its_reason(service_for):
    from tests.fakes import FakeBatchModel

    model = FakeBatchModel(max_batch=3, delay=0.02)
    service = service_for(model)
    first = service.submit(prompt_request("a " * 6, owner="a"))
    for event in first.events():
        if isinstance(event, TextDelta):
            break
    refused = service.submit(prompt_request("please refuse this", owner="b")).result()
    assert refused.reason == "error" and refused.error == "ValueError: the fake model refuses this prompt"
    assert first.result().text == "a " * 6  # the running request went on untouched
    assert service.submit(prompt_request("b c", owner="b")).result().text == "b c "
