"""Hostile model folders and requests, engine-side: remote models, chat templates, conversation
files, exports, presets, settings. Each asserts the safe outcome and a one-line error."""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from loadstar.engine.chat.conversations import Conversation, ConversationStore
from loadstar.engine.chat.messages import ChatMessage
from loadstar.engine.chat.presets import PresetStore
from loadstar.engine.errors import BadRequestError, LoadstarError
from loadstar.engine.facade import Engine
from loadstar.engine.generation.pipeline import RequestPipeline
from loadstar.engine.generation.requests import Finished, GenerationRequest
from loadstar.engine.generation.service import GenerationService
from loadstar.engine.sampling import SamplingParams
from loadstar.engine.settings import Settings
from loadstar.engine.user_settings import UserSettingsStore
from tests.fakes import FakeModel
from tests.test_generation import Slot


class Attacker:
    """An HTTP server that records every request it gets (it must get none)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        attacker = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                attacker.requests.append((self.path, self.headers.get("Authorization", "")))
                body = b'{"data": [{"id": "x"}]}'
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_POST = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"


@pytest.fixture
def attacker():
    server = Attacker()
    yield server
    server.server.shutdown()


def remote_model(models, name, config, downloaded=False):
    folder = models / name
    folder.mkdir(parents=True)
    (folder / "remote.json").write_text(json.dumps(config))
    if downloaded:
        (folder / "loadstar-download.json").write_text(json.dumps({"repo": "evil/remote", "files": {}}))
    return folder


def test_a_downloaded_remote_json_is_never_loaded(tmp_path, attacker, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_value")
    models = tmp_path / "models"
    remote_model(models, "evil_remote", {"base_url": attacker.url, "model": "x", "api_key_env": "HF_TOKEN"},
                 downloaded=True)
    engine = Engine(Settings(models_dir=models, data_dir=tmp_path / "data", hub_token="hf_secret_token_value"))
    try:
        remote = next(c for c in engine.models.candidates("evil_remote") if c.loader == "Remote (OpenAI API)")
        assert not remote.usable and "downloaded folder" in remote.reason
        with pytest.raises(LoadstarError) as refused:
            engine.load_model("evil_remote", "Remote (OpenAI API)")
        assert "\n" not in str(refused.value)
    finally:
        engine.close()
    assert attacker.requests == []


def test_remote_json_may_only_name_a_key_variable_the_operator_allowed(tmp_path, attacker, monkeypatch):
    monkeypatch.setenv("LOADSTAR_ADMIN_KEY", "admin-secret-value")
    models = tmp_path / "models"
    remote_model(models, "mine", {"base_url": attacker.url, "model": "x", "api_key_env": "LOADSTAR_ADMIN_KEY"})
    engine = Engine(Settings(models_dir=models, data_dir=tmp_path / "data", admin_key="admin-secret-value"))
    try:
        with pytest.raises(LoadstarError) as refused:
            engine.load_model("mine")
        assert "--remote-key-env LOADSTAR_ADMIN_KEY" in str(refused.value) and "\n" not in str(refused.value)
    finally:
        engine.close()
    assert attacker.requests == []
    # the operator names the variable: its key (and only it) is sent
    engine = Engine(Settings(models_dir=models, data_dir=tmp_path / "data2",
                             remote_keys=(("LOADSTAR_ADMIN_KEY", "admin-secret-value"),)))
    try:
        engine.load_model("mine")
    finally:
        engine.close()
    assert attacker.requests == [("/v1/models", "Bearer admin-secret-value")]


HOSTILE_TEMPLATES = {
    "nested loops": "{% for a in range(100000) %}{% for b in range(100000) %}{% for c in range(100000) %}"
                    "{% endfor %}{% endfor %}{% endfor %}",
    "huge string": "{{ 'x' * 10**8 ~ 'y' * 10**8 ~ 'z' * 10**8 ~ ('w' * 10**8) * 9 }}",
    "huge power": "{{ 9**9999999 }}",
}


@pytest.mark.parametrize("name", HOSTILE_TEMPLATES)
def test_a_hostile_chat_template_is_refused_and_the_engine_stays_free(name):
    hostile = FakeModel("hostile")
    hostile.chat_template = HOSTILE_TEMPLATES[name]
    pipeline = RequestPipeline()
    slot = Slot(hostile)
    service = GenerationService(slot, pipeline=pipeline)
    try:
        started = time.monotonic()
        handle = service.submit(GenerationRequest(messages=(ChatMessage(role="user", content="hi"),)))
        events = list(handle.events())
        assert time.monotonic() - started < 10
        finished = events[-1]
        assert isinstance(finished, Finished) and finished.reason == "error"
        assert "refused" in finished.error or "could not be rendered" in finished.error
        assert "\n" not in finished.error
        slot.client.chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"  # the next request works
        done = list(service.submit(GenerationRequest(messages=(ChatMessage(role="user", content="hi there"),))).events())[-1]
        assert isinstance(done, Finished) and done.reason == "stop" and done.text.strip() == "hi there"
    finally:
        service.close()
        slot.client.unload()
        pipeline.close()


def test_an_import_with_nan_is_refused_and_nothing_is_saved(tmp_path):
    store = ConversationStore(tmp_path / "conversations")
    data = b'{"format": "loadstar-conversation/1", "title": "t", "created": NaN, "messages": []}'
    with pytest.raises(BadRequestError):
        store.import_(None, data)
    assert store.summaries(None) == []


def test_a_lone_surrogate_is_a_clear_error():
    with pytest.raises(ValueError, match="lone surrogate"):
        ChatMessage(role="user", content="\ud800")
    with pytest.raises(BadRequestError, match="lone surrogate"):
        GenerationRequest(prompt="ok \udfff")


def test_exports_are_private_to_their_login_and_follow_no_link(tmp_path):
    store = ConversationStore(tmp_path / "data" / "conversations")
    conversation = store.save("alice", Conversation(title="mine", messages=[ChatMessage(role="user", content="hi")]))
    path = store.export_file("alice", conversation)
    assert path.is_relative_to(tmp_path / "data" / "exports" / "alice")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.parent.parent.stat().st_mode) == 0o700
    # a link planted where bob's export folder goes: refused, the linked folder untouched
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.json").write_text("{}")
    bobs = store.save("bob", Conversation(title="b", messages=[ChatMessage(role="user", content="x")]))
    (tmp_path / "data" / "exports" / "bob").mkdir(mode=0o700)
    os.symlink(elsewhere, tmp_path / "data" / "exports" / "bob" / bobs.id)
    with pytest.raises(OSError, match="link"):
        store.export_file("bob", bobs)
    assert sorted(p.name for p in elsewhere.iterdir()) == ["keep.json"]


def test_temp_files_of_killed_saves_are_cleaned(tmp_path):
    folder = tmp_path / "conversations" / "local"
    folder.mkdir(parents=True)
    stale = folder / ".0123456789abcdef.json.k2j3.tmp"
    fresh = folder / ".fedcba9876543210.json.a1b2.tmp"
    stale.write_bytes(b"x" * 1000)
    fresh.write_bytes(b"x")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    ConversationStore(tmp_path / "conversations").summaries(None)
    assert not stale.exists() and fresh.exists()  # a save in flight right now is left alone


def test_presets_belong_to_their_login(tmp_path):
    root = PresetStore(tmp_path / "presets")
    root.for_user("alice").save("mine", SamplingParams(temperature=0.3))
    assert "mine" in root.for_user("alice").names()
    assert "mine" not in root.for_user("bob").names() and "mine" not in root.names()
    with pytest.raises(BadRequestError, match="no saved preset"):
        root.for_user("bob").delete("mine")
    assert "mine" in root.for_user("alice").names()
    assert root.for_user("../alice").user_dir.parent == root.user_dir  # a login is never a path


def test_deeply_nested_files_are_read_as_damaged_not_as_a_crash(tmp_path):
    settings = tmp_path / "settings.json"
    settings.write_text("[" * 100_000 + "]" * 100_000)
    assert UserSettingsStore(settings).read().last_model is None
    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "deep.yaml").write_text("a: " + "[" * 5000 + "]" * 5000)
    with pytest.raises(BadRequestError) as refused:
        PresetStore(presets).values("deep")
    assert "\n" not in str(refused.value)
