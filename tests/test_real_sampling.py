"""Sampling controls, prompt rendering and Continue with the real default model (SmolLM2 on CPU)."""

import itertools

import pytest

from loadstar.engine.chat.messages import ChatMessage
from loadstar.engine.generation.requests import GenerationRequest, Started, TextDelta
from loadstar.engine.sampling import SamplingParams

pytestmark = pytest.mark.slow

QUESTION = (ChatMessage(role="user", content="What is the capital of France?"),)
STORY = (ChatMessage(role="user", content="Write a long story about a cat who loves the sea."),)


def run(engine, messages=QUESTION, stop=(), continue_last=False, **params):
    params = {"temperature": 0, "max_new_tokens": 40, **params}
    handle = engine.submit(GenerationRequest(messages=messages, params=SamplingParams(**params), stop=stop,
                                             continue_last=continue_last))
    events = list(handle.events())
    return events, events[-1]


def test_the_engine_renders_the_models_own_template_as_transformers_does(real_engine):
    messages = (ChatMessage(role="system", content="Be brief."), *QUESTION,
                ChatMessage(role="assistant", content="Paris."), ChatMessage(role="user", content="And Italy?"))
    prepared = real_engine.preview(GenerationRequest(messages=messages))
    with real_engine.models.local() as model:
        expected = model.tokenizer.apply_chat_template([m.as_dict() for m in messages], tokenize=False,
                                                       add_generation_prompt=True)
    assert prepared.prompt == expected and prepared.format_name == "model's own"
    assert prepared.notices == ()


def test_stop_string_split_across_tokens_is_cut_and_never_shown(real_engine):
    events, done = run(real_engine, stop=("of Fr",))
    assert done.reason == "stop" and done.text == "The capital "
    shown = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert shown == "The capital " and "of" not in shown


def test_max_new_tokens_and_ban_eos(real_engine):
    _, short = run(real_engine, max_new_tokens=3)
    assert short.reason == "length" and short.completion_tokens == 3
    _, free = run(real_engine)
    assert free.reason == "stop" and free.completion_tokens < 40
    _, banned = run(real_engine, ban_eos=True)
    assert banned.reason == "length" and banned.completion_tokens == 40
    assert banned.text.startswith(free.text.strip())


def test_special_tokens_are_shown_only_when_asked(real_engine):
    _, hidden = run(real_engine)
    _, shown = run(real_engine, skip_special_tokens=False)
    assert "<|im_end|>" not in hidden.text and shown.text == hidden.text + "<|im_end|>"


def test_penalties_change_a_repetitive_reply(real_engine):
    _, plain = run(real_engine, STORY, max_new_tokens=60)
    _, no_repeat = run(real_engine, STORY, max_new_tokens=60, no_repeat_ngram_size=2)
    _, penalised = run(real_engine, STORY, max_new_tokens=60, repetition_penalty=1.5)
    _, presence = run(real_engine, STORY, max_new_tokens=60, presence_penalty=2.0, frequency_penalty=1.0)
    assert len({plain.text, no_repeat.text, penalised.text, presence.text}) == 4
    with real_engine.models.local() as model:
        ids = model.tokenizer(no_repeat.text, add_special_tokens=False)["input_ids"]
    bigrams = list(itertools.pairwise(ids))
    assert len(bigrams) > 20 and len(set(bigrams)) >= len(bigrams) - 2  # re-tokenising may merge a pair


def test_sampling_filters_take_effect_with_a_seed(real_engine):
    sample = dict(temperature=1.5, top_p=1.0, top_k=0, seed=7, max_new_tokens=30)
    _, wide = run(real_engine, STORY, **sample)
    _, again = run(real_engine, STORY, **sample)
    _, min_p = run(real_engine, STORY, **sample, min_p=0.3)
    _, typical = run(real_engine, STORY, **sample, typical_p=0.2)
    assert wide.text == again.text
    assert min_p.text != wide.text and typical.text != wide.text


def test_a_long_prompt_is_cut_to_the_context_with_a_notice(real_engine):
    long = (ChatMessage(role="user", content="word " * 600 + "What is the capital of France?"),)
    events, done = run(real_engine, long, truncation_length=300, max_new_tokens=10)
    started = next(e for e in events if isinstance(e, Started))
    assert any("was cut to its last 290 tokens" in n for n in started.notices)
    assert done.reason in ("stop", "length") and done.completion_tokens > 0


def test_continue_picks_up_the_reply_where_it_stopped(real_engine):
    _, whole = run(real_engine)
    _, start = run(real_engine, max_new_tokens=4)
    partial = (*QUESTION, ChatMessage(role="assistant", content=start.text))
    events, rest = run(real_engine, partial, continue_last=True)
    started = next(e for e in events if isinstance(e, Started))
    assert started.prompt.endswith("<|im_start|>assistant\n" + start.text)
    assert (start.text + rest.text).strip() == whole.text.strip()
