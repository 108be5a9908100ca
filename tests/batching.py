"""Continuous batching checks, the same for every loader that batches (llama.cpp, Transformers,
AutoGPTQ): a test module subclasses ``BatchingChecks`` and gives a ``batch_engine`` fixture, an
engine with a real batching model loaded."""

from __future__ import annotations

import threading

import pytest

from loadstar.engine.chat.messages import ChatMessage
from loadstar.engine.generation.requests import GenerationRequest, TextDelta
from loadstar.engine.sampling import SamplingParams
from tests.helpers import CAPITAL_QUESTION

QUESTIONS = [
    CAPITAL_QUESTION, "What is the capital of Italy?", "Name three colours.", "What is 2 + 2?",
    "Write a haiku about the sea.", "What do bees make?", "Who wrote Hamlet?", "What is water made of?",
]
GREEDY = dict(temperature=0, max_new_tokens=48)
STORY = (ChatMessage(role="user", content="Write a short story about a cat who finds a key."),)


def ask(question: str, **params) -> GenerationRequest:
    return GenerationRequest(messages=(ChatMessage(role="user", content=question),),
                             params=SamplingParams(**{**GREEDY, **params}), owner=f"client-{question}")


def answers_alone(engine, questions=QUESTIONS, **params) -> dict[str, str]:
    """Each question's greedy answer asked alone (a batch of one)."""
    return {q: engine.submit(ask(q, **params)).result().text for q in questions}


def question_of(handle) -> str:
    return handle.request.messages[-1].content


def batch_answers_as_each_request_alone(engine, alone, questions=QUESTIONS, **params) -> None:
    handles = [engine.submit(ask(q, **params)) for q in questions * 2]  # the batch fills; the others join as they leave
    seen_running = 0
    while not all(h.finished for h in handles):
        seen_running = max(seen_running, engine.generation.running)
        threading.Event().wait(0.01)
    for handle in handles:
        done = handle.result()
        assert done.reason in ("stop", "length") and done.text == alone[question_of(handle)], question_of(handle)
    assert seen_running > 1  # they really ran together


def request_joins_a_running_batch(engine, alone, question=QUESTIONS[1]) -> None:
    long = GenerationRequest(messages=STORY, params=SamplingParams(temperature=0, max_new_tokens=200), owner="writer")
    writer = engine.submit(long)
    for event in writer.events():
        if isinstance(event, TextDelta):
            break  # the story is being written
    joiner = engine.submit(ask(question))
    answer = joiner.result()
    assert writer.finished is None  # it joined, and finished, while the story went on
    assert answer.text == alone[question]
    story = writer.result()
    assert story.reason in ("stop", "length") and story.completion_tokens > answer.completion_tokens


def stopping_one_sequence_leaves_the_others_untouched(engine, alone, questions=QUESTIONS[:4]) -> None:
    handles = [engine.submit(ask(q)) for q in questions]
    victim = handles[2]
    deltas = 0
    for event in victim.events():
        if isinstance(event, TextDelta):
            deltas += 1
            if deltas == 3:
                victim.cancel()  # mid-way, while the others decode beside it
    assert victim.result().reason == "cancelled" and victim.result().completion_tokens < GREEDY["max_new_tokens"]
    for handle in handles[:2] + handles[3:]:
        assert handle.result().text == alone[question_of(handle)]


def a_stop_string_ends_one_sequence(engine, alone, questions=QUESTIONS[:3]) -> None:
    handles = [engine.submit(ask(q)) for q in questions]
    cut = GenerationRequest(messages=(ChatMessage(role="user", content=CAPITAL_QUESTION),),
                            params=SamplingParams(**GREEDY), stop=("Paris",), owner="cutter")
    stopped = engine.submit(cut).result()
    assert stopped.reason == "stop" and "Paris" not in stopped.text
    for handle in handles:
        assert handle.result().text == alone[question_of(handle)]


def a_seeded_sample_is_the_same_alone_and_in_a_batch(engine) -> None:
    """Each sequence samples with a generator of its own: its neighbours never shift its draws."""
    sampled = dict(temperature=1.0, top_p=0.95, top_k=0, seed=4321, max_new_tokens=24)
    alone = engine.submit(ask(QUESTIONS[4], **sampled)).result().text
    others = [engine.submit(ask(q, temperature=1.0, seed=7 + i, max_new_tokens=40)) for i, q in enumerate(QUESTIONS[:3])]
    beside = engine.submit(ask(QUESTIONS[4], **sampled)).result().text
    for handle in others:
        handle.result()
    assert beside == alone


class BatchingChecks:
    """The checks as tests, for a module's ``batch_engine``."""

    @pytest.fixture(scope="class")
    def alone(self, batch_engine):
        return answers_alone(batch_engine)

    def test_a_batch_answers_as_each_request_alone(self, batch_engine, alone):
        batch_answers_as_each_request_alone(batch_engine, alone)  # 16 requests: 4 decode together

    def test_a_request_joins_a_running_batch(self, batch_engine, alone):
        request_joins_a_running_batch(batch_engine, alone)

    def test_stopping_one_sequence_leaves_the_others_untouched(self, batch_engine, alone):
        stopping_one_sequence_leaves_the_others_untouched(batch_engine, alone)

    def test_a_stop_string_ends_one_sequence_of_a_batch(self, batch_engine, alone):
        a_stop_string_ends_one_sequence(batch_engine, alone)

    def test_a_seeded_sample_is_the_same_alone_and_in_a_batch(self, batch_engine):
        a_seeded_sample_is_the_same_alone_and_in_a_batch(batch_engine)
