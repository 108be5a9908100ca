"""Anthropic's Messages API on the same engine, through the real anthropic client and the real model."""

from __future__ import annotations

import json

import pytest

from loadstar.engine.models.default_model import DEFAULT_MODEL_NAME
from tests.folders import default_and_tools_models
from tests.helpers import running_server

pytestmark = pytest.mark.slow

KEY = "messages-key-123"
GREEDY = {"temperature": 0}  # this anthropic client has no temperature argument; the server reads it from the body
TOOLS_MODEL = "SmolLM2-tools"
WEATHER = {"name": "get_weather", "description": "The current weather in a city.",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    import anthropic

    root = tmp_path_factory.mktemp("messages")
    models = default_and_tools_models(root / "models", TOOLS_MODEL)
    with running_server(root, "--models-dir", str(models), "--api-key", KEY, "--load-on-request",
                        "--max-models", "2") as url:
        yield anthropic.Anthropic(base_url=url, api_key=KEY, max_retries=0, timeout=300)  # sends x-api-key


def test_a_message_and_its_stream_say_the_same(client):
    question = [{"role": "user", "content": "What is the capital of France?"}]
    reply = client.messages.create(model="claude-sonnet-4", max_tokens=40, extra_body=GREEDY,
                                   system="You are a helpful assistant. Answer concisely and accurately.",
                                   messages=question)
    assert reply.type == "message" and reply.role == "assistant" and reply.id.startswith("msg_")
    assert reply.model == DEFAULT_MODEL_NAME
    assert reply.content[0].type == "text" and "Paris" in reply.content[0].text
    assert reply.stop_reason == "end_turn"  # greedy: "The capital of France is Paris." and the end of the turn
    assert reply.usage.input_tokens > 10 and reply.usage.output_tokens > 0

    with client.messages.stream(model="claude-sonnet-4", max_tokens=40, extra_body=GREEDY,
                                system="You are a helpful assistant. Answer concisely and accurately.",
                                messages=question) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) > 1  # it streamed
    assert "".join(pieces) == reply.content[0].text == final.content[0].text
    assert final.stop_reason == reply.stop_reason and final.usage.output_tokens == reply.usage.output_tokens


def test_a_stop_sequence_is_named(client):
    reply = client.messages.create(model="x", max_tokens=40, extra_body=GREEDY, stop_sequences=["Paris"],
                                   messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert reply.stop_reason == "stop_sequence" and reply.stop_sequence == "Paris"
    assert "Paris" not in reply.content[0].text


def test_tool_use_and_its_result_round_trip(client):
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    reply = client.messages.create(model=TOOLS_MODEL, max_tokens=60, extra_body=GREEDY, tools=[WEATHER],
                                   tool_choice={"type": "tool", "name": "get_weather"}, messages=question)
    assert reply.model == TOOLS_MODEL and reply.stop_reason == "tool_use"
    use = next(block for block in reply.content if block.type == "tool_use")
    assert use.name == "get_weather" and isinstance(use.input.get("city"), str) and use.id.startswith("toolu_")

    with client.messages.stream(model=TOOLS_MODEL, max_tokens=60, extra_body=GREEDY, tools=[WEATHER],
                                tool_choice={"type": "any"}, messages=question) as stream:
        streamed = stream.get_final_message()
    streamed_use = next(block for block in streamed.content if block.type == "tool_use")
    assert streamed.stop_reason == "tool_use" and streamed_use.input == use.input  # the same greedy call

    follow_up = [*question, {"role": "assistant", "content": [use.model_dump()]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                               "content": json.dumps({"temperature": 18, "sky": "sunny"})}]}]
    answer = client.messages.create(model=TOOLS_MODEL, max_tokens=40, extra_body=GREEDY, tools=[WEATHER],
                                    messages=follow_up)
    assert answer.usage.input_tokens > reply.usage.input_tokens  # the call and its result are in the prompt
    assert answer.stop_reason == "end_turn", answer.content  # greedy: a sentence about the weather, then the end


def test_bad_requests_are_anthropic_clients_errors(client):
    import anthropic

    with pytest.raises(anthropic.BadRequestError) as refused:
        client.messages.create(model="x", max_tokens=10, messages=[{"role": "user", "content": "hi"}],
                               tool_choice={"type": "tool", "name": "nowhere"}, tools=[WEATHER])
    assert "nowhere" in str(refused.value)
    wrong_key = client.with_options(api_key="not-the-key")
    with pytest.raises(anthropic.AuthenticationError):
        wrong_key.messages.create(model="x", max_tokens=10, messages=[{"role": "user", "content": "hi"}])


def test_n_is_refused_the_messages_api_has_none(client):
    """n=3 once mixed three replies into one stream, and silently dropped two when not streamed."""
    import anthropic

    for stream in (False, True):
        with pytest.raises(anthropic.BadRequestError) as refused:
            if stream:
                with client.messages.stream(model="x", max_tokens=5, extra_body={"n": 3},
                                            messages=[{"role": "user", "content": "hi"}]) as events:
                    list(events.text_stream)
            else:
                client.messages.create(model="x", max_tokens=5, extra_body={"n": 3},
                                       messages=[{"role": "user", "content": "hi"}])
        assert "the Messages API has no n" in str(refused.value)
    one = client.messages.create(model="x", max_tokens=5, extra_body={"n": 1}, messages=[{"role": "user", "content": "hi"}])
    assert one.content[0].type == "text"
