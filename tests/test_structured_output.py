"""JSON replies and tool calls in the engine: schema checks, reading calls in each model family's
way, and what a loader that cannot constrain its output gets (the real grammar path is tested
through the API with llama.cpp in test_api_clients.py)."""

import json
import math

import pytest

from loadstar.engine.chat.json_reply import check_schema, parse_reply
from loadstar.engine.chat.messages import ChatMessage
from loadstar.engine.chat.tool_calls import CallWatch, ToolCall, ToolUse, find_calls, template_takes_tools
from loadstar.engine.errors import BadRequestError
from loadstar.engine.generation.requests import GenerationRequest, Started
from loadstar.engine.models.loader_api import OutputSpec
from loadstar.engine.sampling import SamplingParams
from tests.fakes import FakeModel
from tests.test_generation import service_for  # noqa: F401 - a fixture

NAMES = ["get_weather", "get_time"]
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.mark.parametrize("text, content", [
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', ""),
    ('Let me look.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>', "Let me look."),
    ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]', ""),
    ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}', ""),
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', ""),
    ('```json\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}\n```', ""),
])
def test_calls_are_read_in_each_familys_way(text, content):
    found, calls = find_calls(text, NAMES)
    assert found == content
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]
    assert calls[0].id.startswith("call_")


def test_several_tagged_calls_and_what_is_not_a_call():
    text = ('<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>\n'
            '<tool_call>{"name": "get_time", "arguments": {"city": "Lima"}}</tool_call>')
    assert [c.name for c in find_calls(text, NAMES)[1]] == ["get_weather", "get_time"]
    for text in ('{"name": "rm_rf", "arguments": {}}',  # not an offered tool
                 '{"name": "get_weather", "arguments": [1]}',  # arguments not an object
                 'The weather is {"name": "get_weather"} fine',  # JSON inside prose is text
                 '<tool_call>{"name": "get_weather", "arguments": {"city"</tool_call>'):  # broken JSON
        assert find_calls(text, NAMES) == (text, ())


def test_templates_that_read_tools_are_told_apart():
    assert template_takes_tools("{% if tools %}{{ tools | tojson }}{% endif %}{{ messages }}")
    assert not template_takes_tools("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert not template_takes_tools("{% for tools in x %}{{ tools }}{% endfor %}")  # a loop variable, not the input
    assert not template_takes_tools("{% if %}")


def test_tool_use_checks_what_it_is_given():
    with pytest.raises(BadRequestError, match="not among the tools"):
        ToolUse((WEATHER,), "required", "get_time")
    with pytest.raises(BadRequestError, match="same name"):
        ToolUse((WEATHER, WEATHER))
    with pytest.raises(BadRequestError, match="need chat messages"):
        GenerationRequest(prompt="hi", tools=ToolUse((WEATHER,)))
    schema = ToolUse((WEATHER,), "required").call_schema()
    assert schema["properties"]["name"] == {"const": "get_weather"}


def test_schemas_are_checked_as_untrusted_input():
    assert check_schema({"type": "object"}) == {"type": "object"}
    deep: dict = {"type": "object"}
    for _ in range(40):
        deep = {"type": "object", "properties": {"a": deep}}
    for schema, words in (([1], "must be an object"), ({"type": 5}, "not valid"), (deep, "nested more than"),
                          ({"description": "x" * 70_000}, "too large")):
        with pytest.raises(BadRequestError, match=words):
            check_schema(schema)
    with pytest.raises(BadRequestError, match="top_logprobs"):
        GenerationRequest(prompt="hi", output=OutputSpec(logprobs=21))


@pytest.mark.parametrize("schema, why", [
    ({"type": "string", "minLength": 5, "maxLength": 2}, "minLength 5 with maxLength 2 at the top level"),
    ({"type": "integer", "minimum": 5, "exclusiveMaximum": 5}, "minimum 5 with exclusiveMaximum 5 at the top level"),
    ({"allOf": [{"type": "string"}, {"type": "integer"}]}, "types integer and string together at the top level"),
    ({"type": "object", "required": ["a"], "properties": {"a": {"enum": []}}}, "an empty enum at 'a' in the top level"),
    ({"type": "object", "required": ["b"], "additionalProperties": False}, "'b' is required but no property may be added at the top level"),
    ({"type": "array", "minItems": 1, "items": {"type": "array", "minItems": 2, "maxItems": 0}},
     "minItems 2 with maxItems 0 at the items of the top level"),
])
def test_a_schema_no_value_can_satisfy_is_refused_where_it_contradicts_itself(schema, why):
    """A grammar cannot hold such bounds: the model wrote JSON the schema then refused, and the API
    answered 500 as if the server had failed."""
    with pytest.raises(BadRequestError) as refused:
        check_schema(schema)
    assert str(refused.value) == f"the JSON schema allows no value: {why}"


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"a": {"type": "string", "minLength": 2, "maxLength": 1}}},  # optional: may be left out
    {"type": "number", "minimum": 1, "maximum": 1},
    {"allOf": [{"type": "number"}, {"type": "integer"}]},
    {"type": "array", "items": {"enum": []}},  # the empty array
])
def test_schemas_that_some_value_satisfies_are_taken(schema):
    assert check_schema(schema) == schema


def test_replies_are_validated_and_unwrapped_from_a_fence():
    schema = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 3}}, "required": ["n"]}
    assert parse_reply('```json\n{"n": 2}\n```', schema) == ('{"n": 2}', None)
    assert "greater than the maximum" in parse_reply('{"n": 7}', schema)[1]
    assert "at n" in parse_reply('{"n": 7}', schema)[1]
    assert "not valid JSON" in parse_reply("Sure! Here it is", schema)[1]
    # One fenced block among prose (what unconstrained models write) is the reply; two are not.
    prose = 'Here is one:\n```json\n{"n": 1}\n```\nThis object has n set to one.'
    assert parse_reply(prose, schema) == ('{"n": 1}', None)
    two = prose + '\n```json\n{"n": 2}\n```'
    assert "not valid JSON" in parse_reply(two, schema)[1]
    assert "not valid JSON" in parse_reply('Text\n```\nnot json\n```\nmore', schema)[1]


def test_a_loader_that_cannot_constrain_gets_its_reply_validated(service_for):  # noqa: F811
    asked = OutputSpec(json_schema={"type": "object"})
    service = service_for(FakeModel(reply='```json {"ok": true} ```'))
    done = service.submit(GenerationRequest(prompt="hi", output=asked)).result()
    assert done.reason == "error" and "not valid JSON" in done.error and "Fake cannot constrain" in done.error
    assert not done.bad_request
    service = service_for(FakeModel(reply='{"ok": true}'))
    done = service.submit(GenerationRequest(prompt="hi", output=asked)).result()
    assert done.reason == "stop" and json.loads(done.text) == {"ok": True}
    service = service_for(FakeModel(reply='{"ok": true, "more": [1, 2, 3]}'))
    done = service.submit(GenerationRequest(prompt="hi", output=asked, params=SamplingParams(max_new_tokens=2))).result()
    assert done.reason == "length" and "the reply ran out of tokens (max_tokens 2) before its JSON ended" in done.notices


def test_logprobs_from_a_loader_without_them_is_a_bad_request(service_for):  # noqa: F811
    service = service_for(FakeModel(reply="one two"))
    done = service.submit(GenerationRequest(prompt="hi", output=OutputSpec(logprobs=0))).result()
    assert done.reason == "error" and done.bad_request and "does not give log probabilities" in done.error


def test_tools_reach_the_template_and_calls_end_the_reply(service_for):  # noqa: F811
    model = FakeModel(reply='<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>')
    model.chat_template = "{% for t in tools or [] %}[{{ t.function.name }}]{% endfor %}{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    service = service_for(model)
    call = ToolCall("call_1", "get_weather", '{"city": "Rome"}')
    messages = (ChatMessage(role="user", content="Weather?"),
                ChatMessage(role="assistant", content="", tool_calls=(call,)),
                ChatMessage(role="tool", content="sunny", tool_call_id="call_1"),
                ChatMessage(role="user", content="And Oslo?"))
    handle = service.submit(GenerationRequest(messages=messages, tools=ToolUse((WEATHER,))))
    events = list(handle.events())
    started, done = next(e for e in events if isinstance(e, Started)), events[-1]
    assert started.prompt == "[get_weather]<user>Weather?<assistant><tool>sunny<user>And Oslo?"
    assert done.reason == "tool_calls" and done.text == ""
    assert [(c.name, json.loads(c.arguments)) for c in done.tool_calls] == [("get_weather", {"city": "Oslo"})]
    refused = service_for(FakeModel(reply="x")).submit(GenerationRequest(messages=messages[:1], tools=ToolUse((WEATHER,))))
    assert refused.result().bad_request and "does not take tools" in refused.result().error
    talker = FakeModel(reply="no call here")
    talker.chat_template = model.chat_template
    must = service_for(talker).submit(GenerationRequest(messages=messages[:1], tools=ToolUse((WEATHER,), "required")))
    assert "did not call a tool" in must.result().error and "Fake cannot constrain" in must.result().error
    free = service_for(talker).submit(GenerationRequest(messages=messages[:1], tools=ToolUse((WEATHER,))))
    assert free.result().reason == "stop" and free.result().text == "no call here "


@pytest.mark.slow
def test_the_transformers_loader_has_its_json_validated_and_gives_logprobs(real_engine):
    """The real unconstrained path: the real model on Transformers, which cannot constrain its
    output, and gives log probabilities through its batch."""
    question = (ChatMessage(role="user", content="Describe a cat as a JSON object with name and age."),)
    done = real_engine.submit(GenerationRequest(
        messages=question, params=SamplingParams(temperature=0, max_new_tokens=80),
        output=OutputSpec(json_schema={"type": "object"}))).result()
    # Greedy SmolLM2 writes a fenced JSON object and then a sentence about it: the object is the reply.
    assert done.reason == "stop", done.error
    assert isinstance(json.loads(done.text), dict)
    capital = (ChatMessage(role="user", content="What is the capital of France? Answer in one word."),)
    plain = real_engine.submit(GenerationRequest(messages=capital, params=SamplingParams(temperature=0, max_new_tokens=24))).result()
    done = real_engine.submit(GenerationRequest(messages=capital, params=SamplingParams(temperature=0, max_new_tokens=24),
                                                output=OutputSpec(logprobs=3))).result()
    assert done.reason in ("stop", "length") and done.text == plain.text and "Paris" in done.text, done
    assert len(done.logprobs) == done.completion_tokens  # the end-of-sequence token is neither
    assert b"".join(t.chosen.bytes for t in done.logprobs).decode() == done.text
    for token in done.logprobs:
        assert token.chosen.logprob <= 0 and len(token.top) == 3
        assert token.top[0].token == token.chosen.token  # greedy: the chosen one is the most likely
        assert math.isclose(token.top[0].logprob, token.chosen.logprob, abs_tol=1e-9)
        assert sum(math.exp(t.logprob) for t in token.top) <= 1 + 1e-9


@pytest.mark.slow
def test_a_transformers_model_that_does_not_batch_refuses_logprobs(real_engine, service_for):  # noqa: F811
    """The real network wrapped as the Transformers loader wraps it with max_batch 1 (no reload:
    the loaded weights are shared), served by a real generation service."""
    from dataclasses import replace

    from loadstar.engine.models.loader_api import FEATURE_LOGPROBS
    from loadstar.loaders.hf_causal_lm import HFCausalLM, batch_size

    with real_engine.models.local() as loaded:
        network, tokenizer, info = loaded.model, loaded.tokenizer, loaded.info
    assert FEATURE_LOGPROBS in info.features  # the batching model gives them
    assert batch_size(network, 1) == (1, "one request at a time")  # the loader's words for max_batch 1
    alone = HFCausalLM(network, tokenizer, replace(info, features=info.features - {FEATURE_LOGPROBS}), max_batch=1)
    assert FEATURE_LOGPROBS not in alone.info.features
    refused = service_for(alone).submit(GenerationRequest(prompt="Hello", output=OutputSpec(logprobs=2))).result()
    assert refused.bad_request and refused.error == "Transformers does not give log probabilities (logprobs)"


def test_a_call_watch_shows_prose_and_holds_what_may_be_a_call():
    def shown(pieces, final):
        watch = CallWatch()
        out = "".join(watch.add(piece) for piece in pieces)
        return out, out + watch.rest(final)

    # prose streams; a tail that may start a marker waits, and comes at the end
    assert shown(["It is ", "sunny <"], "It is sunny <") == ("It is sunny ", "It is sunny <")
    assert shown(["It is ", "sunny <", "3"], "It is sunny <3") == ("It is sunny <3", "It is sunny <3")
    # a call after prose: the prose is shown, the call held; the text besides the call ends it
    tagged = ["Let me check.", " <tool_", 'call>{"name": "f", "arguments": {}}</tool_call>']
    assert shown(tagged, "Let me check.") == ("Let me check. ", "Let me check. ")
    # a reply that begins like JSON or a fence may be a call as a whole: held to the end
    assert shown(["  {", '"name": "f"}'], "") == ("", "")
    assert shown(["```", "json"], "```json") == ("", "```json")
    assert shown(["[TOOL_CALLS]", "[]"], "") == ("", "")
    # an extension changed what was shown: nothing more is sent
    assert shown(["Hello there"], "HELLO THERE") == ("Hello there", "Hello there")
