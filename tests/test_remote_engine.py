"""remote_engine: a second Loadstar started by the test serves the model over its OpenAI API;
this engine chats with it, streaming, and Stop cancels the remote generation."""

import json
import re
import time
import urllib.request

import pytest

from loadstar.engine.chat.messages import ChatMessage
from loadstar.engine.errors import ModelLoadError
from loadstar.engine.facade import Engine
from loadstar.engine.generation.requests import Finished, GenerationRequest, Started, TextDelta
from loadstar.engine.sampling import SamplingParams
from loadstar.engine.settings import Settings
from tests.helpers import CAPITAL_QUESTION, free_port, running_server

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote")
    with running_server(root, "--model", MODEL) as url:
        yield url


def remote_folder(models, url, **extra):
    folder = models / "smol-remote"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "remote.json").write_text(json.dumps({"base_url": f"{url}/v1", "model": MODEL, **extra}))
    return folder


def cancelled_count(url):
    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    return int(re.search(r'loadstar_requests_total\{reason="cancelled"\} (\d+)', text).group(1))


@pytest.fixture
def engine(tmp_path, remote):
    remote_folder(tmp_path / "models", remote)
    engine = Engine(Settings(models_dir=tmp_path / "models", data_dir=tmp_path / "data"))
    yield engine
    engine.close()


def test_remote_model_is_chosen_and_chats_streaming(engine, remote):
    [best, *_] = engine.models.candidates("smol-remote")
    assert (best.loader, best.reason) == ("Remote (OpenAI API)", f"{MODEL} at {remote}/v1")
    info = engine.load_model("smol-remote")
    assert info.loader == "Remote (OpenAI API)" and info.dtype == "remote"
    question = (ChatMessage(role="user", content=CAPITAL_QUESTION),)
    handle = engine.submit(GenerationRequest(messages=question, params=SamplingParams(temperature=0, max_new_tokens=40)))
    events = list(handle.events())
    done = events[-1]
    assert isinstance(done, Finished) and done.reason == "stop" and "Paris" in done.text
    # it streamed: the first text alone, the rest in pieces (held up to 20 ms together: engine/models/core.py)
    assert len([e for e in events if isinstance(e, TextDelta)]) > 1
    # the remote server rendered the chat with the model's own template: same answer as locally
    assert done.text.startswith("The capital of France is Paris")
    params = SamplingParams(temperature=1.0, min_p=0.2, presence_penalty=1.0, max_new_tokens=5)
    started = next(e for e in engine.submit(GenerationRequest(messages=question, params=params)).events()
                   if isinstance(e, Started))
    assert started.notices == ("Remote (OpenAI API) ignores min_p",)  # presence_penalty goes through


def test_extra_params_reach_a_server_that_takes_them(tmp_path, remote):
    remote_folder(tmp_path / "models", remote, extra_params=True)
    engine = Engine(Settings(models_dir=tmp_path / "models", data_dir=tmp_path / "data"))
    try:
        engine.load_model("smol-remote")
        story = (ChatMessage(role="user", content="Write a long story about a cat who loves the sea."),)

        def reply(**extra):
            params = SamplingParams(temperature=0, max_new_tokens=40, **extra)
            return engine.submit(GenerationRequest(messages=story, params=params)).result()

        plain, penalised = reply(), reply(repetition_penalty=1.5)
        assert penalised.notices == () and penalised.text != plain.text
    finally:
        engine.close()


def test_stop_cancels_the_remote_generation(engine, remote):
    engine.load_model("smol-remote")
    before = cancelled_count(remote)
    story = (ChatMessage(role="user", content="Write a very long story about a lighthouse keeper."),)
    handle = engine.submit(GenerationRequest(messages=story, owner="me",
                                             params=SamplingParams(temperature=0, max_new_tokens=2000, ban_eos=False)))
    deltas = 0
    for event in handle.events():
        if isinstance(event, TextDelta):
            deltas += 1
            if deltas == 3:
                stopped_at = time.monotonic()
                engine.stop("me")
        if isinstance(event, Finished):
            done = event
    assert done.reason == "cancelled" and time.monotonic() - stopped_at < 2
    deadline = time.monotonic() + 10
    while cancelled_count(remote) == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cancelled_count(remote) == before + 1  # the remote Loadstar stopped generating too


def test_unreachable_or_wrong_remote_is_a_one_line_load_error(tmp_path, remote):
    models = tmp_path / "models"
    remote_folder(models, f"http://127.0.0.1:{free_port()}")
    engine = Engine(Settings(models_dir=models, data_dir=tmp_path / "data"))
    try:
        with pytest.raises(ModelLoadError, match=r"cannot reach http://127.0.0.1:"):
            engine.load_model("smol-remote")
        remote_folder(models, remote, model="not-there")
        with pytest.raises(ModelLoadError, match=f"does not serve 'not-there' \\(it serves: {MODEL}\\)"):
            engine.load_model("smol-remote")
        (models / "smol-remote" / "remote.json").write_text('{"base_url": "file:///etc", "model": "x"}')
        [candidate] = [c for c in engine.models.candidates("smol-remote") if c.loader == "Remote (OpenAI API)"]
        assert not candidate.usable and "remote.json: base_url: must be an http:// or https:// URL" in candidate.reason
    finally:
        engine.close()


def test_reasoning_streamed_in_its_own_field_becomes_a_think_block():
    import json as json_

    from loadstar.extensions.remote_engine import _Pieces

    def line(**delta):
        return "data: " + json_.dumps({"choices": [{"index": 0, "delta": delta}]})

    pieces = _Pieces()
    texts = [p.text for p in map(pieces.read, [
        line(role="assistant", content=""), line(reasoning_content="Lyon? "), line(reasoning_content="No."),
        line(content="Paris."), "data: [DONE]", ": keep-alive",
    ]) if p is not None]
    assert texts == ["<think>Lyon? ", "No.", "</think>\nParis."]
    ollama = _Pieces()  # Ollama and OpenRouter name the field "reasoning"
    assert [ollama.read(line(reasoning="Hm.")).text, ollama.read(line(content="Yes.")).text] == [
        "<think>Hm.", "</think>\nYes."]
