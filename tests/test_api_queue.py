"""API behaviour that needs a slow model: queue timeouts, fairness with the UI's users (fake model)."""

import threading
import time

import pytest
from fastapi.testclient import TestClient

from loadstar.api.app import build_http_app
from loadstar.engine.facade import Engine
from loadstar.engine.plugins.host import PluginHost
from loadstar.engine.settings import Settings
from tests.fakes import FakeLoader, FakeModel, engine_with
from tests.folders import hf_folder


class SlowLoader(FakeLoader):
    def load(self, folder, options):
        return FakeModel(name=folder.name, loader=self.name, reply=" ".join(["word"] * 400), delay=0.01)


@pytest.fixture
def slow_app(tmp_path):
    engine = engine_with(tmp_path, SlowLoader("Slow"), queue_timeout=1.0, api_max_tokens=400)
    hf_folder(tmp_path / "models", "slow-model")
    engine.load_model("slow-model")
    with TestClient(build_http_app(engine)) as client:
        yield engine, client
    engine.close()


def ask(client, max_tokens=400):
    body = {"model": "slow-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens}
    return client.post("/v1/chat/completions", json=body)


def test_a_request_waiting_too_long_gets_a_clear_timeout(slow_app):
    engine, client = slow_app
    first = {}
    hog = threading.Thread(target=lambda: first.setdefault("response", ask(client)))
    hog.start()
    deadline = time.monotonic() + 60
    while not engine.generation.busy:  # the hog is generating
        assert time.monotonic() < deadline, "the first request never started"
        time.sleep(0.005)
    waited = ask(client, max_tokens=5)
    assert waited.status_code == 503
    error = waited.json()["error"]
    assert error["code"] == "queue_timeout" and "waiting in the queue (position 1)" in error["message"]
    hog.join(30)
    assert first["response"].status_code == 200
    assert first["response"].json()["usage"]["completion_tokens"] == 400
    assert engine.generation.waiting == 0  # the timed-out request left the queue


def test_admin_api_is_off_without_an_admin_key(slow_app):
    _, client = slow_app
    response = client.get("/admin/models")
    assert response.status_code == 403 and "--admin-key" in response.json()["error"]["message"]


def test_no_model_loaded_is_a_503_with_a_hint(slow_app):
    engine, client = slow_app
    engine.unload_model()
    response = ask(client, 5)
    assert response.status_code == 503 and response.json()["error"]["code"] == "model_not_loaded"


def test_admin_api_starts_a_download_and_reports_its_progress(tmp_path):
    from tests.hub_standin import HubStandIn
    from tests.test_downloads import REPO, gptq_branch

    hub = HubStandIn().start()
    hub.repo(REPO).add_commit("main", gptq_branch(4, 128, False, 1))
    engine = Engine(Settings(models_dir=tmp_path / "models", data_dir=tmp_path / "data", admin_key="admin-key-123",
                             hub_endpoint=hub.url), plugins=PluginHost([]))
    admin = {"Authorization": "Bearer admin-key-123"}
    try:
        with TestClient(build_http_app(engine)) as client:
            bad = client.post("/admin/downloads", json={"name": "a/b:c:d"}, headers=admin)
            assert bad.status_code == 400 and "more than one ':'" in bad.json()["error"]["message"]
            job = client.post("/admin/downloads", json={"name": REPO}, headers=admin).json()
            deadline = time.monotonic() + 30
            while (state := client.get(f"/admin/downloads/{job['id']}", headers=admin).json())["state"] == "running":
                assert time.monotonic() < deadline
                time.sleep(0.1)
            assert state["state"] == "done" and state["folder"] == "TheBloke_Tiny-Chat-GPTQ"
            assert client.get("/admin/downloads/999", headers=admin).status_code == 404
    finally:
        engine.close()
        hub.stop()
