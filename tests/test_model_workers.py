"""Model workers: every loaded model in a process of its own; the server outlives any of them.

Real parts throughout: the real default model through llama.cpp in a real worker, a real SIGKILL,
a loader that really reads address 0 (tests/crashing_loader.py), the server's own RSS.
"""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from loadstar.engine.chat.messages import ChatMessage
from loadstar.engine.errors import LoadCancelled, ModelLoadError
from loadstar.engine.facade import Engine
from loadstar.engine.generation.requests import GenerationRequest, Started, TextDelta
from loadstar.engine.models.core_client import CoreClient
from loadstar.engine.models.default_model import DEFAULT_MODEL_NAME
from loadstar.engine.sampling import SamplingParams
from loadstar.engine.settings import Settings
from tests.crashing_loader import SegfaultingLoader
from tests.fakes import engine_with
from tests.folders import hf_folder
from tests.helpers import still_there

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=24)
LONG = SamplingParams(temperature=0.0, max_new_tokens=400, ban_eos=True)


def chat(text: str, params: SamplingParams = GREEDY) -> GenerationRequest:
    return GenerationRequest(messages=(ChatMessage(role="user", content=text),), params=params)


def ask(engine: Engine, text: str, params: SamplingParams = GREEDY):
    return engine.submit(chat(text, params)).result()


def wait_for(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture
def worker_engine(default_models_dir, tmp_path):
    engine = Engine(Settings(models_dir=default_models_dir, data_dir=tmp_path / "data", model_workers=True))
    engine.load_model(DEFAULT_MODEL_NAME, "llama.cpp")
    yield engine
    engine.close()


@pytest.mark.slow
def test_a_model_in_a_worker_answers_as_it_does_in_process(worker_engine, default_models_dir, tmp_path):
    with worker_engine.models.use() as model:
        assert isinstance(model, CoreClient) and model.pid not in (None, os.getpid())
        assert psutil.Process(model.pid).parent().pid == os.getpid()
    in_worker = ask(worker_engine, "What is the capital of France?")
    here = Engine(Settings(models_dir=default_models_dir, data_dir=tmp_path / "here", model_workers=False))
    try:
        here.load_model(DEFAULT_MODEL_NAME, "llama.cpp")
        alone = ask(here, "What is the capital of France?")
    finally:
        here.close()
    assert in_worker.error is None and "Paris" in in_worker.text
    assert in_worker.text == alone.text and in_worker.completion_tokens == alone.completion_tokens


@pytest.mark.slow
def test_kill_9_mid_stream_ends_it_in_one_line_and_the_model_comes_back(worker_engine):
    with worker_engine.models.use() as model:
        first_pid = model.pid
    handle = worker_engine.submit(chat("Tell me a long story.", LONG))
    next(e for e in handle.events() if isinstance(e, TextDelta))  # it is streaming
    os.kill(first_pid, signal.SIGKILL)
    finished = handle.result()
    assert finished.reason == "error"
    assert finished.error == f"the model's worker crashed (SIGKILL, signal 9); reloading {DEFAULT_MODEL_NAME}"
    again = ask(worker_engine, "What is the capital of France?")  # waits for the reload, then is answered
    assert again.error is None and "Paris" in again.text
    with worker_engine.models.use() as model:
        assert model.pid != first_pid
    assert still_there(first_pid) is None  # ended and reaped: no zombie left behind


@pytest.mark.slow
def test_unloading_ends_the_worker_and_gives_back_the_memory(default_models_dir, tmp_path):
    me = psutil.Process()
    engine = Engine(Settings(models_dir=default_models_dir, data_dir=tmp_path / "data", model_workers=True))
    try:
        engine.load_model(DEFAULT_MODEL_NAME, "llama.cpp")  # a first load and reply import what the server
        assert ask(engine, "Hi").error is None             # imports for any model (run first, 200 MiB)
        engine.unload_model()
        before = me.memory_info().rss
        engine.load_model(DEFAULT_MODEL_NAME, "llama.cpp")
        assert ask(engine, "Hi").error is None
        with engine.models.use() as model:
            worker = psutil.Process(model.pid)
        assert worker.memory_info().rss > 50 * 2**20  # the model is there, not here
        assert engine.unload_model()
        assert not psutil.pid_exists(worker.pid)
        assert me.memory_info().rss - before < 30 * 2**20
    finally:
        engine.close()


def test_a_loader_that_segfaults_while_loading_is_a_one_line_error(tmp_path):
    engine = engine_with(tmp_path, SegfaultingLoader("Crashes", at_load=True), model_workers=True)
    hf_folder(engine.settings.models_dir, "doomed")
    try:
        with pytest.raises(ModelLoadError) as error:
            engine.load_model("doomed")
        assert str(error.value) == ("Crashes could not load doomed: the model's worker crashed (SIGSEGV, signal 11) "
                                    "while loading it")
        assert engine.loaded is None and engine.models.problem is None
    finally:
        engine.close()


def test_a_model_that_segfaults_twice_in_a_minute_stays_unloaded_with_the_reason(tmp_path):
    engine = engine_with(tmp_path, SegfaultingLoader(), model_workers=True)
    hf_folder(engine.settings.models_dir, "fragile")
    try:
        engine.load_model("fragile")
        assert ask(engine, "hello").text == "first second"
        first = ask(engine, "crash now")
        assert first.reason == "error" and first.error == "the model's worker crashed (SIGSEGV, signal 11); reloading fragile"
        assert ask(engine, "hello").text == "first second"  # reloaded once, automatically
        second = ask(engine, "crash again")
        assert second.error == ("the model's worker crashed (SIGSEGV, signal 11); it crashed twice within 60 s, "
                                "so fragile stays unloaded")
        wait_for(lambda: engine.loaded is None)
        assert engine.model_problem == ("the model's worker crashed (SIGSEGV, signal 11) twice within 60 s, "
                                        "so the model stays unloaded (load it again when the cause is fixed)")
        after = ask(engine, "hello")
        assert after.error == "no model is loaded: load one first"
        engine.load_model("fragile")  # the user loads it again: the reason goes
        assert engine.models.problem is None and ask(engine, "hello").text == "first second"
    finally:
        engine.close()


def test_a_cancelled_load_ends_its_worker_at_once(tmp_path):
    import threading

    from loadstar.engine.errors import LoadCancelled
    from tests.fakes import FakeLoader

    engine = engine_with(tmp_path, FakeLoader("Slow", load_seconds=60), model_workers=True)
    hf_folder(engine.settings.models_dir, "slow")
    cancel = threading.Event()
    threading.Timer(1.0, cancel.set).start()
    started = time.monotonic()
    try:
        with pytest.raises(LoadCancelled):
            engine.load_model("slow", cancel=cancel)
        assert time.monotonic() - started < 30  # not the loader's 60 s
        assert not [p for p in psutil.Process().children() if "worker_main" in " ".join(p.cmdline())]
    finally:
        engine.close()


@pytest.mark.slow
def test_the_server_outlives_its_worker_and_answers_after_the_reload(tmp_path, default_models_dir):
    """Through server.py and the real openai client: kill -9 of the worker mid-stream."""
    import threading

    import httpx
    import openai

    from tests.helpers import free_port, main_thread_wakeups, start_server, stop_server, wait_for_health

    port = free_port()
    log = tmp_path / "server.log"
    server = start_server("--models-dir", str(default_models_dir), "--data-dir", str(tmp_path / "data"),
                          "--port", str(port), log=log)
    try:
        wait_for_health(port, server, log)
        # Idle, the event loop sleeps: Gradio's queue polled every 1 ms (about 1,100 wakes a second),
        # each taking a core from the model's threads on a small machine (webui.asgi._calm_queue).
        assert main_thread_wakeups(server.pid) < 300
        base = f"http://127.0.0.1:{port}"
        worker = next(p for p in psutil.Process(server.pid).children() if "worker_main" in " ".join(p.cmdline()))
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", timeout=300, max_retries=0)
        health: list[int] = []
        watching = threading.Event()

        def watch() -> None:  # /health answers throughout
            while not watching.is_set():
                health.append(httpx.get(f"{base}/health", timeout=60).status_code)
                time.sleep(0.05)

        watcher = threading.Thread(target=watch)
        watcher.start()
        stream = client.chat.completions.create(
            model="any", messages=[{"role": "user", "content": "Tell me a long story."}], stream=True,
            max_tokens=400, temperature=0)
        pieces = 0
        with pytest.raises(openai.APIError) as error:
            for _chunk in stream:
                pieces += 1
                if pieces == 3:
                    worker.kill()
        assert str(error.value) == f"the model's worker crashed (SIGKILL, signal 9); reloading {DEFAULT_MODEL_NAME}"
        answer = client.chat.completions.create(
            model="any", messages=[{"role": "user", "content": "What is the capital of France?"}], temperature=0)
        assert "Paris" in answer.choices[0].message.content
        watching.set()
        watcher.join()
        assert health and set(health) == {200}
        assert server.poll() is None
        assert httpx.get(f"{base}/health", timeout=60).json() == {"status": "ok", "model_loaded": True,
                                                                   "model_problem": None}
    finally:
        stop_server(server)


def two_default_models(root):
    """A models folder holding the default model under two names (hard links: no copy)."""
    from loadstar.engine.models.default_model import place_default_model

    models = root / "two"
    first = place_default_model(models)
    second = models / "SmolLM2-copy"
    second.mkdir()
    for file in first.iterdir():
        os.link(file, second / file.name)
    return models


@pytest.mark.slow
def test_two_models_resident_answer_alternating_requests_without_reloading(tmp_path):
    models = two_default_models(tmp_path)
    engine = Engine(Settings(models_dir=models, data_dir=tmp_path / "data", max_models=2))
    try:
        engine.load_model(DEFAULT_MODEL_NAME)
        engine.ensure_loaded("SmolLM2-copy")
        assert [m.name for m in engine.resident_models()] == [DEFAULT_MODEL_NAME, "SmolLM2-copy"]
        assert engine.loaded.name == DEFAULT_MODEL_NAME  # loading for a request does not change the current model
        pids = {m: engine.models._resident[m].model.pid for m in (DEFAULT_MODEL_NAME, "SmolLM2-copy")}
        answers = []
        for name in [DEFAULT_MODEL_NAME, "SmolLM2-copy"] * 2:
            request = GenerationRequest(messages=(ChatMessage(role="user", content="What is the capital of France?"),),
                                        params=GREEDY, model=name)
            started = engine.submit(request)
            first = next(e for e in started.events() if isinstance(e, Started))
            assert first.model == name
            answers.append(started.result().text)
        assert len(set(answers)) == 1 and "Paris" in answers[0]  # the same weights, greedy: the same answer
        assert pids == {m: engine.models._resident[m].model.pid for m in pids}  # nobody was reloaded
        # A third model past --max-models 2: the least recently used one goes.
        third = models / "SmolLM2-third"
        third.mkdir()
        for file in (models / DEFAULT_MODEL_NAME).iterdir():
            os.link(file, third / file.name)
        engine.ensure_loaded(DEFAULT_MODEL_NAME)  # used: now the copy is the least recently used
        with engine.models.use(DEFAULT_MODEL_NAME):
            pass
        engine.ensure_loaded("SmolLM2-third")
        assert {m.name for m in engine.resident_models()} == {DEFAULT_MODEL_NAME, "SmolLM2-third"}
        assert still_there(pids["SmolLM2-copy"]) is None  # ended and reaped
    finally:
        engine.close()


def test_an_idle_model_is_unloaded(tmp_path):
    from tests.fakes import FakeLoader

    engine = engine_with(tmp_path, FakeLoader("Fake"), idle_unload_minutes=0.02)  # 1.2 s
    hf_folder(engine.settings.models_dir, "sleepy")
    engine.load_model("sleepy")
    assert ask(engine, "hello").error is None
    wait_for(lambda: engine.loaded is None, timeout=30)
    assert engine.resident_models() == []


def test_a_load_that_would_not_fit_is_refused_naming_the_numbers(tmp_path):
    from loadstar import MemoryEstimate
    from tests.fakes import FakeLoader

    class Huge(FakeLoader):
        def estimate_memory(self, folder, options):
            return MemoryEstimate(weights=2**50, kv_cache=2**30, context=4096)

    loader = Huge("Huge")
    engine = engine_with(tmp_path, loader)
    hf_folder(engine.settings.models_dir, "giant")
    with pytest.raises(ModelLoadError) as refused:
        engine.load_model("giant")
    message = str(refused.value)
    assert message.startswith("giant needs about 1048577.0 GiB (1048576.0 GiB of weights + 1.0 GiB of KV cache), but ")
    assert "of memory is free" in message and "\n" not in message
    assert loader.loaded == []  # refused before loading


def fake_nvidia_smi(tmp_path, monkeypatch, free_mib: int = 0, command: str | None = None) -> None:
    """An ``nvidia-smi`` on PATH that reports ``free_mib`` MiB free (what the real one prints for
    --query-gpu=memory.free --format=csv,noheader,nounits), or what ``command`` prints: no GPU here,
    the check's code is real."""
    tools = tmp_path / "bin"
    tools.mkdir(exist_ok=True)
    tool = tools / "nvidia-smi"
    tool.write_text(f"#!/bin/sh\n{command or f'echo {free_mib}'}\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tools}{os.pathsep}{os.environ['PATH']}")


@pytest.mark.parametrize(("share", "refused"), [
    (1.0, "whole needs about 2.0 GiB (2.0 GiB of weights), but 1.0 GiB of GPU memory is free: unload a model, "
          "put fewer layers on the GPU, or lower the context or batch in its loader options"),
    (0.75, "whole needs about 1.5 GiB of GPU memory (the 75% of its 2.0 GiB (2.0 GiB of weights) on the GPU), "
           "but 1.0 GiB of GPU memory is free"),
    (0.25, None),  # 512 MiB on the GPU, the rest in RAM: it fits
])
def test_a_load_that_offloads_layers_is_checked_against_the_gpu_memory(tmp_path, monkeypatch, share, refused):
    """llama.cpp's options name no device: its estimate says what share goes to the GPU (n_gpu_layers),
    and that share is checked against the GPU's free memory, the rest against RAM."""
    from loadstar import MemoryEstimate
    from tests.fakes import FakeLoader

    class Offloading(FakeLoader):
        def estimate_memory(self, folder, options):
            return MemoryEstimate(weights=2 * 2**30, gpu_share=share)

    asked = tmp_path / "asked"
    fake_nvidia_smi(tmp_path, monkeypatch, command=f"echo >> {asked}; echo 1024")
    loader = Offloading("Offloading")
    engine = engine_with(tmp_path, loader)
    hf_folder(engine.settings.models_dir, "whole")
    if refused is None:
        engine.load_model("whole")  # (device "auto": the fake loader's default)
        assert engine.loaded is not None and engine.loaded.name == "whole"
        # once for the check (and the free memory before), once after the load: what it took
        assert len(asked.read_text().splitlines()) == 2
        return
    with pytest.raises(ModelLoadError) as error:
        engine.load_model("whole")
    assert str(error.value).startswith(refused)
    assert loader.loaded == []


def gpu_swap_engine(tmp_path, monkeypatch):
    """Two fake 2 GiB models for a GPU with 3 GiB (a stand-in nvidia-smi reading a file the fake
    loads and unloads write): the second fits only once the first is unloaded."""
    from loadstar import MemoryEstimate
    from loadstar.engine.models import manager
    from tests.fakes import FakeLoader, FakeModel

    free = tmp_path / "gpu-free-mib"
    free.write_text("3072")
    fake_nvidia_smi(tmp_path, monkeypatch, command=f"cat {free}")
    monkeypatch.setattr(manager, "SWAP_WAIT_S", 1.5)

    def take(mib: int) -> None:
        free.write_text(str(int(free.read_text()) - mib))

    class GpuModel(FakeModel):
        def unload(self) -> None:
            super().unload()
            take(-2048)

    class OnGpu(FakeLoader):
        def estimate_memory(self, folder, options):
            return MemoryEstimate(weights=2 * 2**30)

        def load(self, folder, options):
            take(2048)
            model = GpuModel(name=folder.name, loader=self.name, reply="word " * 400, delay=0.02)
            self.loaded.append(model)
            return model

    engine = engine_with(tmp_path, OnGpu("OnGpu"))
    for name in ("first", "second"):
        hf_folder(engine.settings.models_dir, name)
    engine.load_model("first")
    busy = engine.submit(GenerationRequest(prompt="tell me", params=SamplingParams(max_new_tokens=400)))
    next(e for e in busy.events() if isinstance(e, TextDelta))
    return engine, busy


def test_a_load_that_needs_a_busy_models_memory_waits_briefly_then_ends_its_requests(tmp_path, monkeypatch):
    """Not 10 minutes with the load lock held: the running request gets SWAP_WAIT_S, then one line."""
    engine, busy = gpu_swap_engine(tmp_path, monkeypatch)
    started = time.monotonic()
    engine.load_model("second")
    took = time.monotonic() - started
    done = busy.result()
    assert 1.4 < took < 60
    assert (done.reason, done.error) == ("error", "the model was unloaded to make room for second")
    assert [m.name for m in engine.resident_models()] == ["second"]


def test_a_load_cancelled_while_it_waits_for_memory_keeps_the_model_it_would_replace(tmp_path, monkeypatch):
    import threading

    engine, busy = gpu_swap_engine(tmp_path, monkeypatch)
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    with pytest.raises(LoadCancelled, match=r"^loading second was cancelled$"):
        engine.load_model("second", cancel=cancel)
    assert [m.name for m in engine.resident_models()] == ["first"] and engine.loaded.name == "first"
    done = busy.result()  # its request went on to the end
    assert done.error is None and done.completion_tokens == 400


def test_llama_cpp_estimates_its_gpu_share_from_n_gpu_layers(default_models_dir):
    """The default GGUF's 30 layers are read from its header; this CPU build of llama.cpp has no GPU
    backend, so nothing goes to a GPU whatever n_gpu_layers says."""
    from loadstar.engine.models.folder import inspect_model_folder
    from loadstar.loaders.llamacpp_loader import LlamaCppLoader, LlamaCppOptions, _gpu_share, gpu_backend_installed
    from loadstar.webui.model_handlers import folder_details

    folder = inspect_model_folder(default_models_dir / DEFAULT_MODEL_NAME)
    assert folder.layers == 30
    assert "\n- Layers: 30" in folder_details(folder)  # the Model tab says what n_gpu_layers counts
    assert gpu_backend_installed() is False
    assert LlamaCppLoader().estimate_memory(folder, LlamaCppOptions(n_gpu_layers=-1)).gpu_share == 0.0
    assert _gpu_share(-1, 30, backend=True) == 1.0
    assert _gpu_share(15, 30, backend=True) == 0.5
    assert _gpu_share(99, 30, backend=True) == 1.0
    assert _gpu_share(0, 30, backend=True) == 0.0
    assert _gpu_share(10, None, backend=True) == 1.0  # unknown layers: counted whole
    from loadstar import MemoryEstimate

    half = MemoryEstimate(weights=2 * 2**30, gpu_share=0.5)  # the Model tab's line says where it goes
    assert half.describe(8 * 2**30, 512 * 2**20) == (
        "About 2.0 GiB: 2.0 GiB of weights (free now: 8.0 GiB); 50% of it on the GPU (1.0 GiB, 512.0 MiB free "
        "there, too little).")
