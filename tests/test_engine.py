import json

import pytest

from loadstar.engine.errors import ModelLoadError, ModelNotFoundError, NoLoaderError
from loadstar.engine.models.default_model import DEFAULT_MODEL_NAME, place_default_model
from loadstar.engine.settings import Settings
from tests.fakes import FakeLoader, engine_with
from tests.folders import hf_folder


def test_failed_load_keeps_the_previous_model(tmp_path):
    good = FakeLoader("Good")
    engine = engine_with(tmp_path, good, FakeLoader("Bad", fail_load=True, priority=1))
    hf_folder(engine.settings.models_dir, "first")
    hf_folder(engine.settings.models_dir, "second")
    engine.load_model("first")
    with pytest.raises(ModelLoadError, match=r"Bad could not load second: RuntimeError: cannot read model.safetensors"):
        engine.load_model("second", "Bad")
    assert engine.models.loaded.name == "first"
    assert not good.loaded[0].unloaded


def test_swapping_models_unloads_the_old_one(tmp_path):
    loader = FakeLoader("Good")
    engine = engine_with(tmp_path, loader)
    hf_folder(engine.settings.models_dir, "first")
    hf_folder(engine.settings.models_dir, "second")
    engine.load_model("first")
    engine.load_model("second")
    assert loader.loaded[0].unloaded and not loader.loaded[1].unloaded
    assert engine.unload_model() is True
    assert engine.models.loaded is None and loader.loaded[1].unloaded
    assert engine.unload_model() is False


def test_folder_without_weights_is_a_one_line_error(tmp_path):
    engine = engine_with(tmp_path, FakeLoader("Good", can_load=False, reason="no weight files"))
    hf_folder(engine.settings.models_dir, "empty", weights=())
    with pytest.raises(NoLoaderError, match="empty holds no weight files"):
        engine.load_model("empty")


def test_bad_loader_options_are_one_line_errors(tmp_path):
    engine = engine_with(tmp_path, FakeLoader("Good"))
    hf_folder(engine.settings.models_dir, "m")
    with pytest.raises(ModelLoadError, match="Good option bogus: Extra inputs are not permitted"):
        engine.models.load("m", options={"bogus": 1})


def test_startup_prefers_cli_then_last_used_then_default(tmp_path):
    engine = engine_with(tmp_path, FakeLoader("Good"))
    models = engine.settings.models_dir
    hf_folder(models, "aaa")
    hf_folder(models, DEFAULT_MODEL_NAME)
    hf_folder(models, "zzz")
    assert engine.startup_choice().model == DEFAULT_MODEL_NAME
    engine.load_model("zzz", "Good")
    remembered = json.loads(engine.settings.settings_file.read_text())
    assert remembered["models"]["zzz"].pop("load_seconds") >= 0
    assert remembered == {"last_model": "zzz", "last_loader": "Good", "extensions": {},
                          "models": {"zzz": {"loader": "Good", "options": {}, "prompt_format": None}}}
    again = engine_with(tmp_path, FakeLoader("Good"))
    choice = again.startup_choice()
    assert (choice.model, choice.loader) == ("zzz", "Good")
    pinned = engine_with(tmp_path, FakeLoader("Good"), model="aaa")
    assert pinned.startup_choice().model == "aaa"


def test_unknown_model_and_empty_models_dir_are_errors(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no model named 'nope'"):
        engine_with(tmp_path, FakeLoader("Good"), model="nope").startup_choice()
    with pytest.raises(ModelNotFoundError, match=r"no models in .*--no-model"):
        engine_with(tmp_path, FakeLoader("Good")).startup_choice()


def test_damaged_settings_file_is_ignored(tmp_path):
    engine = engine_with(tmp_path, FakeLoader("Good"))
    hf_folder(engine.settings.models_dir, "only")
    engine.settings.settings_file.parent.mkdir(parents=True)
    engine.settings.settings_file.write_text("{broken")
    assert engine.startup_choice().model == "only"


def test_stop_reaches_only_the_owner(tmp_path):
    from loadstar.engine.generation.requests import GenerationRequest
    from tests.fakes import FakeModel

    class SlowLoader(FakeLoader):
        def load(self, folder, options):
            return FakeModel(name=folder.name, loader=self.name, reply=" ".join(["w"] * 300), delay=0.01)

    engine = engine_with(tmp_path, SlowLoader("Slow"))
    hf_folder(engine.settings.models_dir, "m")
    engine.load_model("m")
    try:
        alice = engine.submit(GenerationRequest(prompt="x", owner="alice"))
        bob = engine.submit(GenerationRequest(prompt="y", owner="bob"))
        assert engine.stop("nobody") == 0
        assert engine.stop("alice") == 1
        assert alice.result().reason == "cancelled"
        assert bob.result().reason in ("stop", "length") and not bob.cancelled
    finally:
        engine.close()


def test_default_model_placement_is_idempotent_and_atomic(tmp_path):
    first = place_default_model(tmp_path)
    gguf = next(first.glob("*.gguf"))
    inode = gguf.stat().st_ino
    assert place_default_model(tmp_path) == first
    assert gguf.stat().st_ino == inode  # not re-copied
    # no partial files left; beside the weights, the model's defaults
    assert sorted(p.name for p in first.iterdir()) == sorted([gguf.name, "generation_config.json", "loadstar.json"])


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.5", "example.com", "::"])
def test_listening_wider_than_loopback_needs_auth(host):
    with pytest.raises(ValueError, match=f"refusing to listen on {host} without authentication"):
        Settings(host=host)
    with pytest.raises(ValueError, match="without a key"):
        Settings(host=host, auth=(("u", "p"),))
    assert Settings(host=host, auth=(("u", "p"),), api_key="k" * 16).host == host
    assert Settings(host=host, auth=(("u", "p"),), api_enabled=False).host == host


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_loopback_needs_no_auth(host):
    assert Settings(host=host).is_loopback


def test_per_model_settings_are_restored_by_exact_folder_name(tmp_path):
    loader = FakeLoader("Good")
    engine = engine_with(tmp_path, loader, FakeLoader("Other", priority=90))
    models = engine.settings.models_dir
    hf_folder(models, "model-a")
    hf_folder(models, "model-a-v2")  # a name that a prefix or regex match would confuse
    engine.load_model("model-a", "Good", {"device": "cpu"})
    engine.load_model("model-a-v2")  # automatic: Other has the higher priority
    assert engine.models.loaded.loader == "Other"
    assert engine.saved_choice("model-a").loader == "Good"
    assert engine.saved_choice("model-a").options == {"device": "cpu"}
    assert engine.saved_choice("model-a-v2").loader is None
    # A fresh engine (a restart) restores model-a's pinned loader and options on a plain load.
    again = engine_with(tmp_path, FakeLoader("Good"), FakeLoader("Other", priority=90))
    again.load_model("model-a")
    assert again.models.loaded.loader == "Good"
    assert again.reload_model().name == "model-a"


def test_reload_without_a_model_is_an_error(tmp_path):
    from loadstar.engine.errors import BadRequestError

    with pytest.raises(BadRequestError, match="no model is loaded"):
        engine_with(tmp_path, FakeLoader("Good")).reload_model()


def test_a_load_cancelled_while_it_runs_never_replaces_the_current_model(tmp_path):
    import threading

    from loadstar.engine.errors import LoadCancelled

    slow = FakeLoader("Slow", load_seconds=0.5)
    engine = engine_with(tmp_path, slow)
    hf_folder(engine.settings.models_dir, "first")
    hf_folder(engine.settings.models_dir, "second")
    engine.load_model("first")
    assert engine.saved_choice("first").load_seconds >= 0.5  # for the next load's progress bar
    cancel = threading.Event()
    threading.Timer(0.1, cancel.set).start()  # while the loader is busy
    with pytest.raises(LoadCancelled, match="loading second was cancelled"):
        engine.load_model("second", cancel=cancel)
    assert engine.models.loaded.name == "first"
    assert slow.loaded[-1].unloaded  # the cancelled model was unloaded at once, not kept
    with pytest.raises(LoadCancelled):  # cancelled before it starts: nothing is loaded at all
        engine.load_model("second", cancel=cancel)
    assert len(slow.loaded) == 2
    engine.close()


def test_inspections_are_cached_until_a_file_in_the_folder_changes(tmp_path):
    import os

    engine = engine_with(tmp_path, FakeLoader("Good"))
    folder = hf_folder(engine.settings.models_dir, "m")
    first = engine.models.inspect("m")
    assert engine.models.inspect("m") is first  # nothing changed: not read again
    config = folder / "config.json"
    os.utime(config, ns=(config.stat().st_atime_ns, config.stat().st_mtime_ns + 1_000_000))
    assert engine.models.inspect("m") is not first  # a newer file: read again
    second = engine.models.inspect("m")
    (folder / "README.md").write_text("a card")
    assert engine.models.inspect("m") is not second  # a new file: read again
    engine.close()
