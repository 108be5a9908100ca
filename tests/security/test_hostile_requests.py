"""Hostile requests against a running server.py: foreign Host headers, CORS, another login's
session, file inputs that were never uploaded, oversized uploads, bodies that break parsers."""

from __future__ import annotations

import json

import httpx
import pytest

from loadstar.engine.chat.conversations import Conversation, ConversationStore
from loadstar.engine.chat.messages import ChatMessage
from loadstar.engine.generation.requests import GenerationRequest
from loadstar.engine.sampling import SamplingParams
from tests.helpers import free_port, start_server, stop_server, wait_for_health

API_KEY = "user-key-0123456789"
TIMEOUT = httpx.Timeout(120.0)


@pytest.fixture(scope="module")
def loopback(tmp_path_factory):
    root = tmp_path_factory.mktemp("loopback")
    port = free_port()
    process = start_server("--no-model", "--models-dir", str(root), "--data-dir", str(root / "data"),
                           "--port", str(port), log=root / "server.log")
    try:
        wait_for_health(port, process, root / "server.log")
        yield f"http://127.0.0.1:{port}", port
    finally:
        stop_server(process)


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    """Listening on every address (a team server): logins alice and bob, an API key."""
    root = tmp_path_factory.mktemp("team")
    port = free_port()
    process = start_server("--no-model", "--models-dir", str(root), "--data-dir", str(root / "data"),
                           "--host", "0.0.0.0", "--port", str(port), "--auth", "alice:alice-pw",
                           "--auth", "bob:bob-pw", "--api-key", API_KEY, log=root / "server.log")
    try:
        wait_for_health(port, process, root / "server.log")
        yield f"http://127.0.0.1:{port}", root / "data"
    finally:
        stop_server(process)


def login(url: str, user: str, password: str) -> httpx.Client:
    client = httpx.Client(base_url=url, timeout=TIMEOUT)
    response = client.post("/login", data={"username": user, "password": password})
    assert response.status_code == 200, response.text
    return client


@pytest.mark.parametrize("path", ["/config", "/gradio_api/info", "/v1/models", "/health"])
def test_loopback_mode_answers_only_to_loopback_host_names(loopback, path):
    url, port = loopback
    for host in ("evil.example", f"evil.example:{port}", "192.168.1.10"):
        response = httpx.get(url + path, headers={"Host": host}, timeout=TIMEOUT)
        assert response.status_code == 421 and response.json()["error"]["code"] == "host_not_allowed"
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"):
        assert httpx.get(url + path, headers={"Host": host}, timeout=TIMEOUT).status_code == 200


def test_no_cors_headers_for_an_origin_nobody_allowed(team):
    url, _ = team
    alice = login(url, "alice", "alice-pw")
    for path in ("/config", "/gradio_api/info", "/v1/models"):
        headers = {"Host": "loadstar.example", "Origin": "http://evil.example", "Authorization": f"Bearer {API_KEY}"}
        response = alice.get(path, headers=headers)
        assert response.status_code < 500
        assert not [h for h in response.headers if h.lower().startswith("access-control-allow")], dict(response.headers)
        preflight = alice.options(path, headers={**headers, "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in preflight.headers


def test_a_session_is_bound_to_the_login_that_opened_it(team):
    url, _ = team
    alice, bob = login(url, "alice", "alice-pw"), login(url, "bob", "bob-pw")
    join = {"session_hash": "alices-session", "fn_index": 0, "data": [], "event_data": None, "trigger_id": None}
    assert alice.post("/gradio_api/queue/join", json=join).status_code != 403
    stolen = bob.post("/gradio_api/queue/join", json=join)
    assert stolen.status_code == 403 and "another login" in stolen.text
    assert bob.get("/gradio_api/queue/data", params={"session_hash": "alices-session"}).status_code == 403
    assert bob.post("/gradio_api/queue/join", json={**join, "session_hash": "bobs-own"}).status_code != 403


def test_without_a_login_no_route_touches_a_session(team):
    """The heartbeat answered without a login, and its closing stopped that session's reply: anyone
    who had a session's hash could stop another user's generation."""
    url, _ = team
    alice = login(url, "alice", "alice-pw")
    join = {"session_hash": "alices-heart", "fn_index": 0, "data": [], "event_data": None, "trigger_id": None}
    assert alice.post("/gradio_api/queue/join", json=join).status_code != 403
    stranger = httpx.Client(base_url=url, timeout=TIMEOUT)
    for method, path, body in (("GET", "/gradio_api/heartbeat/alices-heart", None),
                               ("GET", "/gradio_api/queue/data?session_hash=alices-heart", None),
                               ("POST", "/gradio_api/cancel", {"session_hash": "alices-heart", "fn_index": 0})):
        refused = stranger.request(method, path, json=body)
        assert refused.status_code == 401 and "log in" in refused.text, (path, refused.status_code, refused.text)
    with alice.stream("GET", "/gradio_api/heartbeat/alices-heart") as beating:  # its owner still may
        assert beating.status_code == 200


def _import_fn(config: dict) -> int:
    ids = [c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == "import-chat"]
    return next(d["id"] for d in config["dependencies"] if [ids[0], "upload"] in [list(t) for t in d["targets"]])


def _run_event(client: httpx.Client, fn_index: int, data: list, session: str) -> dict:
    join = client.post("/gradio_api/queue/join",
                       json={"session_hash": session, "fn_index": fn_index, "data": data, "event_data": None,
                             "trigger_id": None})
    assert join.status_code == 200, join.text
    with client.stream("GET", "/gradio_api/queue/data", params={"session_hash": session}) as events:
        for line in events.iter_lines():
            if line.startswith("data:"):
                message = json.loads(line[5:])
                if message.get("msg") == "process_completed":
                    return message
    raise AssertionError("no process_completed message")


def test_a_file_input_must_really_be_uploaded(team):
    url, data_dir = team
    store = ConversationStore(data_dir / "conversations")
    secret = store.save("alice", Conversation(title="alice's secret",
                                              messages=[ChatMessage(role="user", content="my secret")]))
    alice_file = data_dir / "conversations" / "alice" / f"{secret.id}.json"
    bob = login(url, "bob", "bob-pw")
    fn_index = _import_fn(bob.get("/config").json())
    for path in (str(alice_file), "/etc/passwd"):
        payload = [{"path": path, "meta": {"_type": "gradio.FileData"}, "orig_name": "x.json"}]
        _run_event(bob, fn_index, payload, f"bob-import-{len(path)}")
        assert store.summaries("bob") == []  # nothing imported
    uploads = data_dir / "tmp"
    copied = [p for p in uploads.rglob("*") if p.is_file() and p.name in ("passwd", alice_file.name)]
    assert copied == []  # and nothing copied into the upload folder either


def test_uploads_over_the_limit_are_refused(team):
    url, _ = team
    alice = login(url, "alice", "alice-pw")
    response = alice.post("/gradio_api/upload", files={"files": ("big.json", b"x" * (21 * 1024 * 1024))})
    assert response.status_code == 413


def test_bodies_that_break_parsers_get_a_4xx_with_one_line(team):
    url, _ = team
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    deep = "[" * 100_000 + "]" * 100_000
    surrogate = '{"model": "x", "messages": [{"role": "user", "content": "\\ud800"}]}'
    for body in (deep, surrogate):
        response = httpx.post(f"{url}/v1/chat/completions", content=body, headers=headers, timeout=TIMEOUT)
        assert 400 <= response.status_code < 500, response.text
        message = response.json()["error"]["message"]
        assert "\n" not in message and "Traceback" not in message


@pytest.mark.slow
def test_a_tiny_temperature_is_greedy_not_an_internal_error(real_engine):
    question = (ChatMessage(role="user", content="What is the capital of France?"),)

    def reply(temperature: float) -> str:
        request = GenerationRequest(messages=question, params=SamplingParams(temperature=temperature, max_new_tokens=12))
        done = list(real_engine.submit(request).events())[-1]
        assert done.reason in ("stop", "length"), done.error
        return done.text

    assert reply(1e-39) == reply(0.0)


@pytest.mark.slow
def test_a_reply_cut_inside_a_character_never_ends_in_a_replacement_mark(real_engine):
    import torch

    from loadstar.loaders.hf_sampling import PieceStreamer

    with real_engine.models.local() as model:
        tokenizer = model.tokenizer
    ids = tokenizer("😀", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1 and tokenizer.decode(ids[:1]).endswith("\ufffd")  # one token is half a character
    pieces = []
    streamer = PieceStreamer(tokenizer, pieces.append)
    streamer.put(torch.tensor([[1, 2, 3]]))  # the prompt, which generate() hands over first
    streamer.put(torch.tensor([ids[0]]))  # then max_new_tokens cuts the reply here
    streamer.end()
    assert "".join(p.text for p in pieces) == "" and sum(p.tokens for p in pieces) == 1


@pytest.mark.slow
def test_stop_reaches_a_long_prompt_between_prefill_chunks(real_engine):
    long = (ChatMessage(role="user", content="word " * 3000 + "\nSummarise."),)
    handle = real_engine.submit(GenerationRequest(messages=long, params=SamplingParams(temperature=0, max_new_tokens=5)))
    with real_engine.models.local() as model:
        module = model.model
    calls = []
    original = module.forward

    def forward_then_cancel(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[1] if "input_ids" in kwargs and kwargs["input_ids"] is not None else -1)
        handle.cancel()  # the client goes away while the prompt is being read
        return original(*args, **kwargs)

    module.forward = forward_then_cancel
    try:
        done = handle.result()
    finally:
        del module.forward
    assert done.reason == "cancelled"
    assert calls == [512]  # one chunk of the ~3,000-token prompt, then Stop was seen


def test_an_upload_is_read_only_by_the_login_that_sent_it(team):
    """Gradio serves any file of its upload folder to any login that names its path (a path derived
    from the file's contents): another login's upload was readable."""
    url, _ = team
    alice, bob = login(url, "alice", "alice-pw"), login(url, "bob", "bob-pw")
    sent = alice.post("/gradio_api/upload", files={"files": ("secret.txt", b"alice's plans", "text/plain")})
    assert sent.status_code == 200, sent.text
    [path] = sent.json()
    assert alice.get(f"/gradio_api/file={path}").content == b"alice's plans"
    stolen = bob.get(f"/gradio_api/file={path}")
    assert stolen.status_code == 403 and "another login" in stolen.text
    assert b"alice's plans" not in httpx.get(f"{url}/gradio_api/file={path}", timeout=TIMEOUT).content
