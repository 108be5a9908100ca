"""The llama.cpp loader with the real embedded model (SmolLM2-135M-Instruct, GGUF Q4_1)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from contextlib import contextmanager

import pytest

from loadstar.engine.chat.messages import ChatMessage
from loadstar.engine.errors import LoadstarError
from loadstar.engine.facade import Engine
from loadstar.engine.generation.requests import Finished, GenerationRequest, Started, TextDelta
from loadstar.engine.models.default_model import DEFAULT_MODEL_SYSTEM_MESSAGE
from loadstar.engine.models.folder import gguf_models, missing_parts
from loadstar.engine.sampling import SamplingParams
from loadstar.engine.settings import Settings
from loadstar.loaders.llamacpp_loader import LOADER_NAME
from tests import batching
from tests.folders import gguf_folder
from tests.helpers import CAPITAL_QUESTION

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
QUESTION = (ChatMessage(role="user", content=CAPITAL_QUESTION),)  # why this phrasing: tests/helpers.py
STORY = (ChatMessage(role="user", content="Write a short story about a cat who finds a key."),)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """The default model in a models folder of this module's own (tests add bad folders beside it)."""
    from loadstar.engine.models.default_model import place_default_model

    models = tmp_path_factory.mktemp("llamacpp-models")
    place_default_model(models)
    # In this process: the tests compare with llama.cpp's own objects (tests/test_model_workers.py: in a worker).
    engine = Engine(Settings(models_dir=models, data_dir=tmp_path_factory.mktemp("data"), model_workers=False))
    info = engine.load_startup_model()
    assert info is not None and info.loader == LOADER_NAME
    yield engine
    engine.close()


def run(engine, messages=QUESTION, **params):
    handle = engine.submit(GenerationRequest(messages=messages, params=SamplingParams(**params)))
    events = list(handle.events())
    return events, events[-1]


def test_the_default_model_loads_through_llama_cpp_and_answers_paris(engine):
    info = engine.models.loaded
    assert (info.loader, info.device, info.dtype) == (LOADER_NAME, "cpu", "Q4_1")
    assert info.context_length == 8192 and "context 8192" in info.details
    [best, *others] = engine.models.candidates(MODEL)
    assert best.loader == LOADER_NAME and best.priority == 100
    assert any(c.loader == "Transformers" and c.usable for c in others)  # still offered, with its reason
    events, done = run(engine, temperature=0, max_new_tokens=40)
    assert done.reason == "stop" and "Paris" in done.text
    assert len([e for e in events if isinstance(e, TextDelta)]) > 3  # streamed token by token


def test_greedy_equals_llama_cpps_own_create_completion(engine, default_models_dir):
    from llama_cpp import Llama

    events, done = run(engine, temperature=0, max_new_tokens=40)
    prompt = next(e for e in events if isinstance(e, Started)).prompt
    path = default_models_dir / MODEL / "SmolLM2-135M-Instruct.Q4_1.gguf"
    reference = Llama(str(path), n_ctx=2048, n_threads=2, verbose=False)
    try:
        raw = reference.create_completion(prompt, max_tokens=40, temperature=0, top_k=0, top_p=1.0, min_p=0.0)
        raw_tokens = reference.tokenize(raw["choices"][0]["text"].encode(), add_bos=False, special=True)
    finally:
        reference.close()
    assert done.text == raw["choices"][0]["text"]
    assert done.completion_tokens == raw["usage"]["completion_tokens"]
    assert done.prompt_tokens == raw["usage"]["prompt_tokens"]
    with engine.models.local() as model:  # same token ids, not only the same text
        assert model.encode(done.text)[: len(raw_tokens)] == raw_tokens


def test_seeded_sampling_is_reproducible(engine):
    params = dict(temperature=1.0, top_p=1.0, top_k=0, seed=1234, max_new_tokens=24)
    first, second = run(engine, STORY, **params)[1], run(engine, STORY, **params)[1]
    assert first.text == second.text and first.seed == 1234
    assert run(engine, STORY, **{**params, "seed": 99})[1].text != first.text


@pytest.mark.parametrize("change", [
    {"temperature": 0.2}, {"top_p": 0.3}, {"top_k": 2}, {"min_p": 0.3}, {"typical_p": 0.3},
    {"repetition_penalty": 2.0}, {"presence_penalty": 2.0}, {"frequency_penalty": 2.0},
])
def test_each_mapped_sampler_changes_the_output(engine, change):
    base = dict(temperature=1.5, top_p=1.0, top_k=0, min_p=0.0, seed=7, max_new_tokens=40)
    baseline = run(engine, STORY, **base)[1]
    changed = run(engine, STORY, **{**base, **change})[1]
    assert changed.reason in ("stop", "length") and changed.text != baseline.text, change


def test_ban_eos_and_unsupported_parameters(engine):
    done = run(engine, temperature=0, max_new_tokens=60, ban_eos=True)[1]
    assert done.reason == "length" and done.completion_tokens == 60
    done = run(engine, temperature=0, max_new_tokens=20, no_repeat_ngram_size=3)[1]
    assert any("llama.cpp ignores no_repeat_ngram_size" in n for n in done.notices)
    special = run(engine, temperature=0, max_new_tokens=40, skip_special_tokens=False)[1]
    assert "Paris" in special.text


def stopped_after_three_deltas(engine) -> Finished:
    """A long story, stopped by the user after its third streamed piece."""
    handle = engine.submit(GenerationRequest(messages=STORY, params=SamplingParams(temperature=0, max_new_tokens=400)))
    deltas = 0
    for event in handle.events():
        if isinstance(event, TextDelta):
            deltas += 1
            if deltas == 3:
                handle.cancel()
        if isinstance(event, Finished):
            return event
    raise AssertionError("no Finished event")


def test_stop_ends_a_generation_mid_stream(engine):
    done = stopped_after_three_deltas(engine)
    assert done.reason == "cancelled" and done.completion_tokens < 20


@contextmanager
def watching_eval(engine, watch):
    """Call ``watch(n_tokens)`` on every ``llama_decode`` (what llama.cpp really processes), then restore."""
    import llama_cpp

    original = llama_cpp.llama_decode

    def watched(ctx, batch):
        watch(batch.n_tokens)
        return original(ctx, batch)

    llama_cpp.llama_decode = watched
    try:
        yield
    finally:
        llama_cpp.llama_decode = original


def test_a_second_turn_reuses_the_cached_prefix(engine):
    evaluated = []
    with watching_eval(engine, evaluated.append):
        first = run(engine, QUESTION, temperature=0, max_new_tokens=30)[1]
        turn_two = (*QUESTION, ChatMessage(role="assistant", content=first.text),
                    ChatMessage(role="user", content="And what is the capital of Italy?"))
        evaluated.clear()
        _events, second = run(engine, turn_two, temperature=0, max_new_tokens=30)
    # llama.cpp's own count: every token decoded, minus one per generated token
    prompt_evaluated = sum(evaluated) - second.completion_tokens
    assert second.prompt_tokens > 40
    assert prompt_evaluated < 0.5 * second.prompt_tokens, (prompt_evaluated, second.prompt_tokens)
    assert "Rome" in second.text


def test_cancel_reaches_a_long_prompt_between_chunks(engine):
    long = (ChatMessage(role="user", content="word " * 6000 + "\nSummarise."),)
    handle = engine.submit(GenerationRequest(messages=long, params=SamplingParams(temperature=0, max_new_tokens=5)))
    chunks = []

    def eval_then_cancel(n_tokens):
        chunks.append(n_tokens)
        handle.cancel()  # Stop arrives while the prompt is being read

    with watching_eval(engine, eval_then_cancel):
        done = handle.result()
    assert done.reason == "cancelled"
    # one chunk read (n_batch at most, fewer where a step of it would take long), then Stop was
    # seen: not 6,000 tokens
    assert len(chunks) == 1 and chunks[0] <= 512, chunks


def test_split_gguf_parts_are_one_model():
    names = ["m-00002-of-00003.gguf", "m-00001-of-00003.gguf", "m-00003-of-00003.gguf", "other.Q4_0.gguf"]
    models = gguf_models(names)
    assert [m.parts for m in models] == [
        ("m-00001-of-00003.gguf", "m-00002-of-00003.gguf", "m-00003-of-00003.gguf"), ("other.Q4_0.gguf",)]
    assert missing_parts(gguf_models(["m-00001-of-00003.gguf", "m-00003-of-00003.gguf"])[0]) == ["m-00002-of-00003.gguf"]


def test_bad_gguf_files_are_one_line_errors_and_the_model_stays(engine, default_models_dir, tmp_path):
    models = engine.settings.models_dir
    source = default_models_dir / MODEL / "SmolLM2-135M-Instruct.Q4_1.gguf"
    truncated = models / "truncated"
    truncated.mkdir(exist_ok=True)
    with source.open("rb") as whole:
        (truncated / "truncated.Q4_1.gguf").write_bytes(whole.read(20 * 1024 * 1024))
    gguf_folder(models, "alien", arch="no-such-arch")
    for name in ("truncated", "alien"):
        with pytest.raises(LoadstarError) as refused:
            engine.load_model(name, LOADER_NAME)
        assert "\n" not in str(refused.value) and "Traceback" not in str(refused.value)
        assert engine.models.loaded.name == MODEL  # the previous model is still loaded
    huge = models / "huge-template"  # a repo's chat_template.jinja is read only up to a template's size
    huge.mkdir(exist_ok=True)
    os.link(source, huge / "huge.Q4_1.gguf")
    (huge / "chat_template.jinja").write_text("{{ messages }}" + " " * (2 * 1024 * 1024))
    with pytest.raises(LoadstarError, match=r"chat_template\.jinja is larger than 1\.0 MiB: not a chat template"):
        engine.load_model("huge-template", LOADER_NAME)
    assert engine.models.loaded.name == MODEL
    alien = next(c for c in engine.models.candidates("alien") if c.loader == LOADER_NAME)
    assert not alien.usable and "not known to llama.cpp" in alien.reason
    assert run(engine, temperature=0, max_new_tokens=20)[1].reason == "stop"


def with_template(source, folder, template):
    folder.mkdir(exist_ok=True)
    subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(source),
                    str(folder / "bad.Q4_1.gguf"), "--chat-template", template, "--force"],
                   check=True, capture_output=True, timeout=300)
    return folder


def test_a_gguf_whose_template_fails_is_a_one_line_error(engine, default_models_dir):
    models = engine.settings.models_dir
    source = default_models_dir / MODEL / "SmolLM2-135M-Instruct.Q4_1.gguf"
    previous = engine.models.loaded.name
    # a template that does not even compile: refused at load, the previous model stays
    with_template(source, models / "uncompilable", "{{ messages[0].content | no_such_filter }}")
    with pytest.raises(LoadstarError) as refused:
        engine.load_model("uncompilable", LOADER_NAME)
    assert "chat template does not compile" in str(refused.value) and "\n" not in str(refused.value)
    assert engine.models.loaded.name == previous
    # a template that fails while rendering: the model loads, a chat gets a one-line error
    with_template(source, models / "failing", "{{ messages[0].content.no_such_method() }}")
    engine.load_model("failing", LOADER_NAME)
    try:
        done = run(engine, temperature=0, max_new_tokens=10)[1]
        assert done.reason == "error" and "could not be rendered" in done.error and "\n" not in done.error
    finally:
        engine.load_model(previous)
        shutil.rmtree(models / "failing")
        shutil.rmtree(models / "uncompilable")


def test_model_work_stays_on_the_model_thread(engine):
    threads = set()
    with watching_eval(engine, lambda tokens: threads.add(threading.current_thread().name)):
        run(engine, temperature=0, max_new_tokens=5)
    assert threads == {"loadstar-model"}  # engine.model_thread.ModelThread's one thread


@pytest.fixture(scope="module")
def llama_cpp_server(default_models_dir, tmp_path_factory):
    """llama-cpp-python's own OpenAI-compatible server (a third-party server) with the default model."""
    import time
    import urllib.request

    from tests.helpers import free_port, stop_server

    port = free_port()
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    path = default_models_dir / MODEL / "SmolLM2-135M-Instruct.Q4_1.gguf"
    process = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--model_alias", "smol", "--host",
         "127.0.0.1", "--port", str(port), "--n_ctx", "8192", "--n_threads", "2", "--verbose", "false"],
        stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(log.read_text()[-3000:])
        try:
            urllib.request.urlopen(f"{url}/models", timeout=5)
            break
        except OSError:
            time.sleep(0.5)
    try:
        yield url
    finally:
        stop_server(process)


def test_remote_engine_drives_llama_cpps_own_server(engine, llama_cpp_server, tmp_path):
    import json

    models = tmp_path / "models"
    (models / "smol-llama-server").mkdir(parents=True)
    (models / "smol-llama-server" / "remote.json").write_text(
        json.dumps({"base_url": llama_cpp_server, "model": "smol", "extra_params": True}))
    remote = Engine(Settings(models_dir=models, data_dir=tmp_path / "data"))
    try:
        info = remote.load_model("smol-llama-server")
        assert info.loader == "Remote (OpenAI API)"
        # llama.cpp's server knows nothing of the folder's default system message: both get it spelled out.
        asked = (ChatMessage(role="system", content=DEFAULT_MODEL_SYSTEM_MESSAGE), *QUESTION)
        events, done = run(remote, asked, temperature=0, top_k=0, max_new_tokens=40)
        local = run(engine, asked, temperature=0, top_k=0, max_new_tokens=40)[1]
        assert done.reason == "stop" and "Paris" in done.text
        assert done.text.strip() == local.text.strip()  # the same greedy answer as llama.cpp here
        assert len([e for e in events if isinstance(e, TextDelta)]) > 3  # streamed
        assert stopped_after_three_deltas(remote).reason == "cancelled"
        assert run(remote, temperature=0, max_new_tokens=10)[1].reason in ("stop", "length")  # the server goes on
    finally:
        remote.close()


def test_the_memory_estimate_is_the_file_plus_the_kv_cache_for_the_context(default_models_dir):
    from loadstar.engine.models.folder import inspect_model_folder
    from loadstar.loaders.llamacpp_loader import LlamaCppLoader, LlamaCppOptions

    folder = inspect_model_folder(default_models_dir / MODEL)
    loader = LlamaCppLoader()
    small = loader.estimate_memory(folder, LlamaCppOptions(n_ctx=1024))
    large = loader.estimate_memory(folder, LlamaCppOptions(n_ctx=4096))
    assert small.weights == large.weights == (default_models_dir / MODEL / "SmolLM2-135M-Instruct.Q4_1.gguf").stat().st_size
    assert small.context == 1024 and large.kv_cache == 4 * small.kv_cache
    # SmolLM2-135M: 30 layers, 3 KV heads of 64, keys and values in f16; a cache for each of 4 requests
    assert small.sequences == 4 and small.kv_cache == 4 * 30 * 3 * (64 + 64) * 2 * 1024
    assert small.describe(free=10**12).startswith("About ") and "(4 requests × 1,024 tokens)" in small.describe()
    alone = loader.estimate_memory(folder, LlamaCppOptions(n_ctx=1024, max_batch=1))
    assert alone.kv_cache == small.kv_cache // 4 and "KV cache for 1,024 tokens" in alone.describe()


# -- continuous batching: tests/batching.py's checks, the same for every loader that batches


@pytest.fixture(scope="module")
def batch_engine(engine):
    return engine


class TestBatching(batching.BatchingChecks):
    pass


def test_the_n_choices_of_a_long_prompt_read_it_once(engine):
    """Four requests with the same prompt (what ``n=4`` sends): the first reads it, the others get
    a copy of its cache and read only its last token; greedy, all four answer what one alone does."""
    with engine.models.local() as model:
        batch = model.open_batch()
    prompt = "Here is a list of the rivers of Europe, with their lengths: " + ", ".join(
        f"river number {i}" for i in range(120))
    greedy = SamplingParams(temperature=0, max_new_tokens=8)
    before = batch.prompt_tokens_read
    handles = [engine.submit(GenerationRequest(prompt=prompt, params=greedy, owner=f"choice{i}")) for i in range(4)]
    results = [h.result() for h in handles]
    read = batch.prompt_tokens_read - before
    tokens = results[0].prompt_tokens
    assert tokens > 300 and read <= tokens + 3 * 2, (tokens, read)  # once, not four times
    assert len({r.text for r in results}) == 1 and results[0].text
    with engine.models.use() as client:
        client.call("clear_cache")  # (between two steps, on the core's thread) alone reads it all again
    before = batch.prompt_tokens_read
    alone = engine.submit(GenerationRequest(prompt=prompt, params=greedy)).result()
    assert batch.prompt_tokens_read - before == tokens and alone.text == results[0].text
