import os
import sys
from pathlib import Path

import pytest

# Libraries read these at import time; the app sets them in server.py, tests here.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def pytest_configure(config):
    """Under pytest-xdist (``make test`` runs two workers) each worker gets its own share of the
    CPUs, and so do the servers, model workers and browsers it starts (they inherit it): model code
    sizes its threads by the CPUs it may use, so two workers never run four spinning llama.cpp
    threads on two cores."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker or count < 2 or not hasattr(os, "sched_setaffinity"):
        return
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < count:
        return
    share = set(cpus[int(worker.removeprefix("gw")) % count::count])
    for thread in os.listdir("/proc/self/task"):  # every thread of the worker, not only this one
        try:
            os.sched_setaffinity(int(thread), share)
        except OSError:
            pass


# The longest files, started first: two workers then end together instead of one of them ending
# the run with a GPTQ file that started late (longest first, as measured in phase 1 of a clean
# run; docs/TESTING.md). tools/run_tests.py keeps xdist from reordering them by their test counts.
LONGEST_FIRST = ("test_gptq_accuracy.py", "test_gptq.py", "test_real_model.py", "test_model_workers.py",
                 "test_llamacpp.py", "test_api.py", "test_real_sampling.py", "test_downloads.py",
                 "test_api_clients.py", "test_structured_output.py", "test_tools.py", "test_messages_api.py")


def pytest_collection_modifyitems(config, items):
    """The longest files first; and one place decides what needs CUDA: a test marked ``gpu`` is
    skipped where no CUDA device is (so ``-m gpu`` selects every test that needs one, and no test
    needs its own skipif)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
    needing = [item for item in items if item.get_closest_marker("gpu")]
    if not needing:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marked gpu)")
    for item in needing:
        item.add_marker(skip)


def loose_model_work() -> list[str]:
    """Model threads and model workers of this process still running (none once every engine is closed)."""
    import threading

    import psutil

    threads = [t.name for t in threading.enumerate() if t.name.startswith("loadstar-model") and t.is_alive()]
    workers = [f"worker pid {p.pid}" for p in psutil.Process().children(recursive=True)
               if "loadstar.engine.models.worker_main" in " ".join(_cmdline(p))]
    return threads + workers


def _cmdline(process) -> list[str]:
    try:
        return process.cmdline()
    except Exception:  # it ended meanwhile
        return []


@pytest.fixture(autouse=True)
def _close_engines_made_by_the_test():
    """Close the engines ``tests.fakes.engine_with`` made for the test (their threads and workers end)."""
    from tests.fakes import OPEN_ENGINES

    yield
    while OPEN_ENGINES:
        OPEN_ENGINES.pop().close()
    if os.environ.get("LOADSTAR_TEST_LEAKS"):  # LOADSTAR_TEST_LEAKS=1: name the test that left model work running
        left = loose_model_work()
        assert not left, f"left running: {left}"


@pytest.fixture(scope="session", autouse=True)
def _nothing_left_running_after_the_suite():
    """The suite itself checks that every engine it made was closed: no model thread, no worker left."""
    yield
    import gc

    gc.collect()
    left = loose_model_work()
    assert not left, f"left running after the suite: {left}"


@pytest.fixture(scope="session")
def default_models_dir(tmp_path_factory) -> Path:
    """A models folder holding only the embedded default model (hard-linked, no copy)."""
    from loadstar.engine.models.default_model import place_default_model

    models = tmp_path_factory.mktemp("models")
    place_default_model(models)
    return models


@pytest.fixture(scope="session")
def real_engine(default_models_dir, tmp_path_factory):
    """An engine with the real embedded default model loaded through Transformers (shared: loading
    takes ~10 s). The tests of the llama.cpp loader, the default for GGUF, have their own engine."""
    from loadstar.engine.facade import Engine
    from loadstar.engine.settings import Settings

    engine = Engine(Settings(models_dir=default_models_dir, data_dir=tmp_path_factory.mktemp("data"),
                             loader="Transformers", model_workers=False))  # tests read its tokenizer
    info = engine.load_startup_model()
    assert info is not None and info.name == "SmolLM2-135M-Instruct" and info.loader == "Transformers"
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def checkpoint_cache() -> Path:
    """Where heavy test checkpoints are kept between runs, keyed by their recipe."""
    root = Path(os.environ.get("LOADSTAR_TEST_CACHE", Path.home() / ".cache" / "loadstar-test-checkpoints"))
    root.mkdir(parents=True, exist_ok=True)
    return root


@pytest.fixture(scope="session")
def gptq_folders(checkpoint_cache) -> dict[tuple[int, int, bool], Path]:
    """Every GPTQ test checkpoint by (bits, group size, act-order), built together on first use."""
    from tests.checkpoints import gptq_checkpoints

    return gptq_checkpoints(checkpoint_cache)


@pytest.fixture(scope="session")
def ui_server(tmp_path_factory):
    """server.py with the default model and a folder without weights, shared by the browser tests."""
    from loadstar.engine.models.default_model import place_default_model
    from tests.folders import hf_folder
    from tests.helpers import running_server

    root = tmp_path_factory.mktemp("ui")
    models = root / "models"
    models.mkdir()
    place_default_model(models)
    hf_folder(models, "hollow", weights=())  # bad input: a folder without weights
    with running_server(root, "--models-dir", str(models)) as url:
        yield url + "/"


@pytest.fixture(scope="session")
def browser():
    import shutil

    from tests.browser import CHROMIUM, CHROMIUM_ARGS

    if not shutil.which(CHROMIUM) and not os.path.exists(CHROMIUM):
        pytest.fail("Debian chromium is missing: `make test` installs it")
    from playwright.sync_api import sync_playwright

    from tests.browser import console_errors

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()
    # No page of the whole run logged an error to its console or threw one.
    assert console_errors(browser) == [], "\n".join(console_errors(browser))


@pytest.fixture
def page(browser, ui_server):
    """A fresh browser context (a new user session) on the shared server."""
    from tests.browser import open_page

    page = open_page(browser, ui_server)
    yield page
    page.context.close()
