"""What real API clients ask for, through a real server.py and the real default model (llama.cpp):
JSON mode and JSON schemas, log probabilities, n choices, tool calls, loading the named model on
request; with the openai client and with LangChain's ChatOpenAI.

The models folder holds the default model twice: as shipped (its template takes no tools) and as
"SmolLM2-tools", the same GGUF with a ChatML template that takes tools (tests/data). The server
runs with --load-on-request, so a request names the one it wants.
"""

import json
import math

import httpx
import pytest

from loadstar.engine.models.default_model import DEFAULT_MODEL_NAME
from tests.folders import default_and_tools_models
from tests.helpers import CAPITAL_QUESTION, running_server

pytestmark = pytest.mark.slow

KEY = "clients-key-0123456789"
TOOLS_MODEL = "SmolLM2-tools"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "description": "The time in a city.",
                 "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
}
CAT = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                   "colour": {"type": "string", "enum": ["black", "white", "ginger"]}},
    "required": ["name", "age", "colour"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def server_root(tmp_path_factory):
    return tmp_path_factory.mktemp("clients")


@pytest.fixture(scope="module")
def server(server_root):
    root = server_root
    models = default_and_tools_models(root / "models", TOOLS_MODEL)
    with running_server(root, "--models-dir", str(models), "--api-key", KEY, "--load-on-request",
                        "--api-max-tokens", "96") as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=300)


def ask(text):
    return [{"role": "user", "content": text}]


# -- JSON -----------------------------------------------------------------------------------------


def test_json_object_mode_gives_a_json_object(client):
    reply = client.chat.completions.create(
        model=DEFAULT_MODEL_NAME, messages=ask("Describe a cat as JSON."), temperature=0, max_tokens=80,
        response_format={"type": "json_object"},
    )
    assert isinstance(json.loads(reply.choices[0].message.content), dict)
    plain = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=ask("Describe a cat as JSON."),
                                           temperature=0, max_tokens=80)
    with pytest.raises(ValueError):  # asked plainly, this model writes prose or a fenced block
        json.loads(plain.choices[0].message.content)


def test_json_schema_is_followed_streamed_or_not(client):
    from jsonschema import validate

    fmt = {"type": "json_schema", "json_schema": {"name": "cat", "schema": CAT, "strict": True}}
    for seed in (1, 2, 3):
        reply = client.chat.completions.create(
            model=DEFAULT_MODEL_NAME, messages=ask("Invent a cat."), temperature=0.8, seed=seed, max_tokens=80,
            response_format=fmt,
        )
        validate(json.loads(reply.choices[0].message.content), CAT)
    stream = client.chat.completions.create(
        model=DEFAULT_MODEL_NAME, messages=ask("Invent a cat."), temperature=0, max_tokens=80, response_format=fmt,
        stream=True,
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    validate(json.loads(text), CAT)


def test_json_that_cannot_end_in_time_and_bad_schemas_are_clear_errors(client, server):
    import openai

    # cut by max_tokens: finish_reason "length" as OpenAI answers (the client's choice, not a failure)
    cut = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=ask("Invent a cat."), temperature=0,
                                         max_tokens=3, response_format={"type": "json_object"})
    assert cut.choices[0].finish_reason == "length"
    assert any("before its JSON ended" in notice for notice in cut.model_extra["loadstar"]["notices"])
    impossible = {"type": "object", "required": ["name"],
                  "properties": {"name": {"type": "string", "minLength": 5, "maxLength": 2}}}  # a 500 before
    for schema, words in (({"type": "objekt"}, "not valid"), ({"properties": {"a": {}}} | {"x": "y" * 70_000}, "too large"),
                          (impossible, "allows no value: minLength 5 with maxLength 2 at 'name' in the top level")):
        with pytest.raises(openai.BadRequestError, match=words):
            client.chat.completions.create(
                model=DEFAULT_MODEL_NAME, messages=ask("Hi"), max_tokens=8,
                response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
            )
    health = httpx.get(f"{server}/health", timeout=60)
    assert health.json() == {"status": "ok", "model_loaded": True, "model_problem": None}


# -- log probabilities ----------------------------------------------------------------------------


def test_logprobs_are_the_models_greedy_choice_and_add_up(client):
    reply = client.chat.completions.create(
        model=DEFAULT_MODEL_NAME, messages=ask(CAPITAL_QUESTION), temperature=0, max_tokens=12, logprobs=True,
        top_logprobs=3,
    )
    choice = reply.choices[0]
    tokens = choice.logprobs.content
    assert len(tokens) == reply.usage.completion_tokens
    assert "".join(t.token for t in tokens) == choice.message.content
    assert "Paris" in choice.message.content
    for token in tokens:
        assert token.logprob <= 0 and len(token.top_logprobs) == 3
        assert token.top_logprobs[0].token == token.token  # greedy: the chosen one is the most likely
        assert math.isclose(token.top_logprobs[0].logprob, token.logprob, abs_tol=1e-6)
        assert sum(math.exp(t.logprob) for t in token.top_logprobs) <= 1 + 1e-6
        assert bytes(token.bytes).decode("utf-8", "replace") == token.token


def test_text_completion_logprobs_have_the_legacy_shape(client):
    reply = client.completions.create(model=DEFAULT_MODEL_NAME, prompt="The capital of France is", max_tokens=5,
                                      temperature=0, logprobs=2)
    logprobs = reply.choices[0].logprobs
    assert "".join(logprobs.tokens) == reply.choices[0].text
    assert len(logprobs.token_logprobs) == len(logprobs.tokens) == len(logprobs.top_logprobs)
    assert all(len(top) == 2 for top in logprobs.top_logprobs)
    assert logprobs.text_offset[0] == 0


# -- n choices ------------------------------------------------------------------------------------


def test_n_choices_are_decoded_together_each_with_its_own_seed(client):
    question = ask("Write one sentence about the sea.")
    reply = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=question, n=3, seed=40,
                                           temperature=1.0, max_tokens=24)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    texts = [c.message.content for c in reply.choices]
    assert len(set(texts)) == 3
    tokens = 0
    for offset, text in enumerate(texts):  # choice i is what seed + i gives alone
        alone = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=question, seed=40 + offset,
                                               temperature=1.0, max_tokens=24)
        assert alone.choices[0].message.content == text
        tokens += alone.usage.completion_tokens
    assert reply.usage.completion_tokens == tokens and reply.usage.prompt_tokens == alone.usage.prompt_tokens
    stream = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=question, n=3, seed=40,
                                            temperature=1.0, max_tokens=24, stream=True)
    streamed = ["", "", ""]
    finish = {}
    for chunk in stream:
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    assert streamed == texts and set(finish) == {0, 1, 2}


# -- tools ----------------------------------------------------------------------------------------


def test_a_template_without_tools_refuses_them(client):
    import openai

    with pytest.raises(openai.BadRequestError, match="does not take tools"):
        client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=ask("Weather in Paris?"), tools=[WEATHER],
                                       max_tokens=16)


def test_a_required_tool_call_comes_in_the_openai_shape_and_its_answer_is_read(client):
    question = ask("What is the weather in Paris, in celsius?")
    reply = client.chat.completions.create(model=TOOLS_MODEL, messages=question, tools=[WEATHER, TIME],
                                           tool_choice="required", temperature=0, max_tokens=60)
    assert reply.model == TOOLS_MODEL  # --load-on-request loaded it
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name in {"get_weather", "get_time"} and call.id
    arguments = json.loads(call.function.arguments)
    assert isinstance(arguments.get("city"), str)

    named = client.chat.completions.create(
        model=TOOLS_MODEL, messages=question, tools=[WEATHER, TIME], temperature=0, max_tokens=60,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    call = named.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert set(json.loads(call.function.arguments)) == {"city", "unit"}

    follow_up = [*question, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]}, {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 18, "sky": "sunny"})}]
    answer = client.chat.completions.create(model=TOOLS_MODEL, messages=follow_up, tools=[WEATHER], temperature=0,
                                            max_tokens=40)
    assert answer.choices[0].finish_reason == "stop", answer.choices[0].message  # greedy: prose about the weather
    assert answer.usage.prompt_tokens > reply.usage.prompt_tokens  # the call and its answer are in the prompt


def test_tool_calls_stream_as_one_delta(client):
    stream = client.chat.completions.create(
        model=TOOLS_MODEL, messages=ask("Time in Tokyo?"), tools=[TIME], temperature=0, max_tokens=60,
        tool_choice="required", stream=True,
    )
    calls, finish = [], None
    for chunk in stream:
        for choice in chunk.choices:
            calls += choice.delta.tool_calls or []
            finish = choice.finish_reason or finish
    assert finish == "tool_calls" and len(calls) == 1
    assert calls[0].function.name == "get_time" and "city" in json.loads(calls[0].function.arguments)


def test_with_tools_offered_prose_still_streams_as_it_comes(client):
    question = ask("Write one sentence about cats.")
    whole = client.chat.completions.create(model=TOOLS_MODEL, messages=question, tools=[TIME], temperature=0,
                                           max_tokens=40)
    assert whole.choices[0].finish_reason != "tool_calls" and whole.choices[0].message.content
    stream = client.chat.completions.create(model=TOOLS_MODEL, messages=question, tools=[TIME], temperature=0,
                                            max_tokens=40, stream=True)
    pieces = [chunk.choices[0].delta.content for chunk in stream if chunk.choices and chunk.choices[0].delta.content]
    assert len(pieces) > 3  # as it comes (a few tokens a chunk at most), not one chunk at the end
    assert "".join(pieces) == whole.choices[0].message.content


# -- load on request, model list ------------------------------------------------------------------


def test_load_on_request_loads_the_named_model_and_other_names_get_the_loaded_one(client):
    client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=ask("Hi"), max_tokens=2)
    listed = {m.id: m.model_extra for m in client.models.list().data}
    assert listed[DEFAULT_MODEL_NAME]["loaded"] and not listed[TOOLS_MODEL]["loaded"]
    reply = client.chat.completions.create(model=TOOLS_MODEL, messages=ask("Hi"), max_tokens=2)
    assert reply.model == TOOLS_MODEL
    other = client.chat.completions.create(model="gpt-4o", messages=ask("Hi"), max_tokens=2)
    assert other.model == TOOLS_MODEL and "not loaded" in other.model_extra["loadstar"]["notices"][0]


# -- a second real client -------------------------------------------------------------------------


def test_langchain_chat_openai_chats_gets_structured_output_and_calls_tools(server):
    from langchain_core.messages import HumanMessage
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    llm = ChatOpenAI(model=TOOLS_MODEL, base_url=f"{server}/v1", api_key=KEY, temperature=0, max_tokens=60,
                     timeout=300, max_retries=0)
    said = llm.invoke([HumanMessage(CAPITAL_QUESTION)])
    assert "Paris" in said.content

    class Cat(BaseModel):
        name: str = Field(max_length=20)
        age: int = Field(ge=0, le=30)

    cat = llm.with_structured_output(Cat, method="json_schema").invoke("Invent a cat.")
    assert isinstance(cat, Cat)

    def get_weather(city: str) -> str:
        """The current weather in a city."""
        return "sunny"

    called = llm.bind_tools([get_weather], tool_choice="get_weather").invoke("Weather in Rome?")
    assert called.tool_calls and called.tool_calls[0]["name"] == "get_weather"
    assert isinstance(called.tool_calls[0]["args"]["city"], str)


# -- characters -----------------------------------------------------------------------------------


def test_a_character_named_in_the_request_is_the_system_message(client, server_root):
    from loadstar.engine.chat.characters import Character, CharacterStore

    store = CharacterStore(server_root / "data" / "characters")  # as the Characters tab saves one
    store.save(None, Character(name="Parrot", context="{{char}} is a parrot. {{char}} answers every question "
                               "with exactly one word: Squawk."))
    reply = client.chat.completions.create(
        model=DEFAULT_MODEL_NAME, messages=ask("What is the capital of France?"), temperature=0, max_tokens=8,
        extra_body={"character": "parrot"})  # a name, case ignored
    said = "Parrot is a parrot. Parrot answers every question with exactly one word: Squawk."
    explicit = client.chat.completions.create(
        model=DEFAULT_MODEL_NAME, messages=[{"role": "system", "content": said}, *ask("What is the capital of France?")],
        temperature=0, max_tokens=8)
    plain = client.chat.completions.create(
        model=DEFAULT_MODEL_NAME, messages=ask("What is the capital of France?"), temperature=0, max_tokens=8)
    # exactly as if its description had been sent as the system message (greedy: the same reply)
    assert reply.usage.prompt_tokens == explicit.usage.prompt_tokens != plain.usage.prompt_tokens
    assert reply.choices[0].message.content == explicit.choices[0].message.content
    import openai

    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=ask("hi"), max_tokens=2,
                                       extra_body={"character": "Nobody"})
    assert "no character named 'Nobody'" in str(refused.value)
