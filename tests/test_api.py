"""The OpenAI-compatible API of a real server.py with the real default model, through the real openai client."""

import json
import time
import urllib.request

import httpx
import pytest

from loadstar.engine.models.default_model import (
    DEFAULT_MODEL_FILE,
    DEFAULT_MODEL_NAME,
    DEFAULT_MODEL_SYSTEM_MESSAGE,
    place_default_model,
)
from tests.helpers import CAPITAL_QUESTION, run_concurrently, running_server

pytestmark = pytest.mark.slow

USER_KEY = "user-key-0123456789"
ADMIN_KEY = "admin-key-0123456789"
QUESTION = [{"role": "user", "content": CAPITAL_QUESTION}]


@pytest.fixture(scope="module")
def api_root(tmp_path_factory):
    return tmp_path_factory.mktemp("api")


@pytest.fixture(scope="module")
def api_server(api_root):
    root = api_root
    models = root / "models"
    place_default_model(models)
    with running_server(root, "--models-dir", str(models), "--api-key", USER_KEY, "--admin-key", ADMIN_KEY,
                        "--api-max-tokens", "64") as url:
        yield url


@pytest.fixture(scope="module")
def client(api_server):
    import openai

    return openai.OpenAI(base_url=f"{api_server}/v1", api_key=USER_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer(default_models_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_models_dir / DEFAULT_MODEL_NAME, gguf_file=DEFAULT_MODEL_FILE)


def test_models_lists_every_local_model_with_its_loader_the_loaded_one_first(client, api_root):
    import shutil

    from tests.folders import hf_folder

    other = hf_folder(api_root / "models", "other-model")  # a Transformers folder beside the loaded GGUF
    try:
        listed = client.models.list().data
        assert [m.id for m in listed] == [DEFAULT_MODEL_NAME, "other-model"]
        assert (listed[0].model_extra["loaded"], listed[0].model_extra["loader"]) == (True, "llama.cpp")
        assert (listed[1].model_extra["loaded"], listed[1].model_extra["loader"]) == (False, "Transformers")
    finally:
        shutil.rmtree(other)
    assert [m.id for m in client.models.list().data] == [DEFAULT_MODEL_NAME]


def test_any_model_name_is_answered_by_the_loaded_model_and_said_so(client):
    reply = client.chat.completions.create(model="gpt-4o-mini", messages=QUESTION, temperature=0, max_tokens=20)
    assert "Paris" in reply.choices[0].message.content
    assert reply.model == DEFAULT_MODEL_NAME  # the response names the model that answered
    assert "model 'gpt-4o-mini' is not loaded: SmolLM2-135M-Instruct answered" in reply.model_extra["loadstar"]["notices"]


def test_echo_and_suffix_are_refused_with_a_clear_400(client):
    import openai

    for unsupported, words in (({"echo": True}, "echo is not supported"), ({"suffix": "}"}, "suffix")):
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(model=DEFAULT_MODEL_NAME, prompt="def f(", max_tokens=4, **unsupported)
        assert words in refused.value.body["message"]


def test_chat_completion_greedy_with_usage_matching_the_tokenizer(client, tokenizer):
    reply = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=QUESTION, temperature=0, max_tokens=40)
    choice = reply.choices[0]
    assert "Paris" in choice.message.content and choice.message.role == "assistant"
    assert choice.finish_reason == "stop" and reply.object == "chat.completion"
    # The embedded model's folder names a system message (loadstar.json), used when a chat has none.
    with_system = [{"role": "system", "content": DEFAULT_MODEL_SYSTEM_MESSAGE}, *QUESTION]
    prompt = tokenizer.apply_chat_template(with_system, tokenize=False, add_generation_prompt=True)
    assert reply.usage.prompt_tokens == len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    text_tokens = len(tokenizer(choice.message.content, add_special_tokens=False)["input_ids"])
    assert reply.usage.completion_tokens in (text_tokens, text_tokens + 1)  # + the end-of-turn token
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_chat_streaming_equals_the_plain_answer(client):
    plain = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=QUESTION, temperature=0, max_tokens=40)
    chunks = list(client.chat.completions.create(
        model=DEFAULT_MODEL_NAME, messages=QUESTION, temperature=0, max_tokens=40, stream=True,
        stream_options={"include_usage": True},
    ))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["stop"]
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    # streamed in pieces: the first text alone, then what came within each 20 ms (engine/models/core.py)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1


def test_text_completion_plain_and_streaming(client):
    plain = client.completions.create(model=DEFAULT_MODEL_NAME, prompt="The capital of France is", temperature=0,
                                      max_tokens=8)
    assert "Paris" in plain.choices[0].text and plain.object == "text_completion"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=DEFAULT_MODEL_NAME, prompt="The capital of France is", temperature=0, max_tokens=8, stream=True))
    assert streamed == plain.choices[0].text


def test_stop_sequences_and_max_tokens(client):
    stopped = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=QUESTION, temperature=0,
                                             max_tokens=40, stop=["Paris", "paris"])
    assert "Paris" not in stopped.choices[0].message.content
    assert stopped.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=DEFAULT_MODEL_NAME, messages=QUESTION, temperature=0, max_tokens=40, stop=[" Par"], stream=True))
    assert streamed == stopped.choices[0].message.content.rstrip(" ")  # split stop string: never leaked
    short = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=QUESTION, temperature=0, max_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3


def test_same_seed_same_sample(client):
    kwargs = dict(model=DEFAULT_MODEL_NAME, messages=QUESTION, temperature=1.0, seed=42, max_tokens=20)
    assert client.chat.completions.create(**kwargs).choices[0].message.content == \
        client.chat.completions.create(**kwargs).choices[0].message.content


def test_penalties_and_server_extensions_take_effect(client):
    story = [{"role": "user", "content": "Write a long story about a cat who loves the sea."}]
    kwargs = dict(model=DEFAULT_MODEL_NAME, messages=story, temperature=0, max_tokens=40)
    plain = client.chat.completions.create(**kwargs).choices[0].message.content
    penalised = client.chat.completions.create(**kwargs, presence_penalty=2.0, frequency_penalty=1.0)
    repeated = client.chat.completions.create(**kwargs, extra_body={"repetition_penalty": 1.5})
    assert len({plain, penalised.choices[0].message.content, repeated.choices[0].message.content}) == 3
    import openai

    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(**kwargs, extra_body={"repetition_penalty": 0.5})


def test_errors_have_the_openai_shape(client, api_server):
    import openai

    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=QUESTION, n=9)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=[])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=QUESTION, temperature=9)
    headers = {"Authorization": f"Bearer {USER_KEY}", "Content-Type": "application/json"}
    bad_json = httpx.post(f"{api_server}/v1/chat/completions", content=b"{not json", headers=headers)
    assert bad_json.status_code == 400 and bad_json.json()["error"]["type"] == "invalid_request_error"
    huge = httpx.post(f"{api_server}/v1/chat/completions", content=b"x" * (5 * 1024 * 1024), headers=headers)
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "body_too_large"


def test_keys(api_server):
    import openai

    for key in ("wrong-key-0000000", ""):
        anonymous = openai.OpenAI(base_url=f"{api_server}/v1", api_key=key or "x", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            anonymous.models.list()
    assert httpx.get(f"{api_server}/v1/models").status_code == 401
    user = {"Authorization": f"Bearer {USER_KEY}"}
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    assert httpx.get(f"{api_server}/admin/models", headers=user).status_code == 403
    assert httpx.get(f"{api_server}/admin/models").status_code == 401
    listing = httpx.get(f"{api_server}/admin/models", headers=admin).json()
    assert listing["models"] == [{"name": DEFAULT_MODEL_NAME, "summary": listing["models"][0]["summary"], "loaded": True}]
    assert listing["loaded"]["loader"] == "llama.cpp"
    missing = httpx.post(f"{api_server}/admin/models/load", headers=admin, json={"model": "nope"})
    assert missing.status_code == 404 and "no model named 'nope'" in missing.json()["error"]["message"]
    assert httpx.get(f"{api_server}/health").json() == {"status": "ok", "model_loaded": True, "model_problem": None}


def test_no_cors_headers_without_an_allow_list(api_server):
    response = httpx.options(f"{api_server}/v1/models", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "GET"})
    assert "access-control-allow-origin" not in response.headers


def metric(api_server, name):
    text = httpx.get(f"{api_server}/metrics", headers={"Authorization": f"Bearer {USER_KEY}"}).text
    for line in text.splitlines():
        if line.startswith(name + " ") or (line.startswith(name + "{") and line.split(" ")[0] == name):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} missing from /metrics:\n{text}")


def test_metrics_count_requests_and_tokens(client, api_server):
    before = metric(api_server, "loadstar_tokens_generated_total")
    done_before = metric(api_server, 'loadstar_requests_total{reason="stop"}')
    client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=QUESTION, temperature=0, max_tokens=40)
    assert metric(api_server, "loadstar_tokens_generated_total") > before
    assert metric(api_server, 'loadstar_requests_total{reason="stop"}') == done_before + 1
    assert metric(api_server, "loadstar_queue_length") == 0
    assert metric(api_server, "loadstar_tokens_per_second") > 0


def test_a_client_that_disconnects_cancels_its_generation(client, api_server):
    cancelled_before = metric(api_server, 'loadstar_requests_total{reason="cancelled"}')
    body = {"model": DEFAULT_MODEL_NAME, "messages": [{"role": "user", "content": "Write a very long story."}],
            "temperature": 0, "max_tokens": 64, "stream": True}
    with httpx.stream("POST", f"{api_server}/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {USER_KEY}"}, timeout=60) as response:
        lines = response.iter_lines()
        for _ in range(4):
            next(lines)
    # The connection is closed now: the server must stop generating for nobody.
    deadline = time.monotonic() + 30
    while metric(api_server, 'loadstar_requests_total{reason="cancelled"}') == cancelled_before:
        assert time.monotonic() < deadline, "the abandoned generation was not cancelled"
        time.sleep(0.2)
    started = time.monotonic()
    client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=QUESTION, temperature=0, max_tokens=10)
    assert time.monotonic() - started < 20  # the model is free again


def test_eight_concurrent_streaming_clients_get_unmixed_answers(api_server):
    import openai

    countries = ["France", "Germany", "Italy", "Spain", "Japan", "Canada", "Egypt", "Peru"]

    def ask(country, client):
        stream = client.chat.completions.create(
            model=DEFAULT_MODEL_NAME, temperature=0, max_tokens=24, stream=True,
            messages=[{"role": "user", "content": f"What is the capital of {country}?"}])
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    alone = {c: ask(c, openai.OpenAI(base_url=f"{api_server}/v1", api_key=USER_KEY, max_retries=0)) for c in countries}
    together = run_concurrently(
        lambda c: ask(c, openai.OpenAI(base_url=f"{api_server}/v1", api_key=USER_KEY, max_retries=0, timeout=300)),
        countries,
    )
    assert together == alone


def test_openapi_schema_is_served(api_server):
    schema = json.loads(urllib.request.urlopen(f"{api_server}/openapi.json").read())
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/admin/models/load"} <= set(schema["paths"])


def test_schemathesis_finds_no_server_errors(api_server, tmp_path):
    """Property-based requests generated from our own OpenAPI schema (bounded): no 5xx, no hang."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run", f"{api_server}/openapi.json",
         "--checks", "not_a_server_error", "--max-examples", "8", "--request-timeout", "120",
         "--header", f"Authorization: Bearer {ADMIN_KEY}", "--exclude-path", "/admin/models/load",
         "--exclude-path", "/admin/models/unload", "--phases", "examples,fuzzing"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
