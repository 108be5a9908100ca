"""Presets: YAML that lists only what changes, built-ins read-only, model defaults underneath."""

import json

import pytest

from loadstar.engine.chat.presets import (
    BUILTIN_PRESETS_DIR,
    PresetStore,
    generation_config_defaults,
    model_system_message,
)
from loadstar.engine.errors import BadRequestError
from loadstar.engine.sampling import SamplingParams
from tests.fakes import FakeLoader
from tests.folders import hf_folder
from tests.test_engine import engine_with


def test_builtin_presets_are_valid_and_listed_first(tmp_path):
    store = PresetStore(tmp_path / "user")
    names = store.names()
    assert names[:2] == ["Creative", "Default"] and "Deterministic" in names
    for name in names:
        SamplingParams.model_validate(store.values(name))
    assert store.values("Deterministic") == {"temperature": 0.0} and store.values("Default") == {}


def test_save_writes_only_the_changed_values_and_delete_removes_it(tmp_path):
    store = PresetStore(tmp_path / "user")
    path = store.save("my preset", SamplingParams(temperature=0.2, min_p=0.05))
    assert path.read_text().splitlines()[1:] == ["min_p: 0.05", "temperature: 0.2"]
    assert store.values("my preset") == {"min_p": 0.05, "temperature": 0.2} and "my preset" in store.names()
    store.delete("my preset")
    assert "my preset" not in store.names()


@pytest.mark.parametrize(("name", "message"), [
    ("Deterministic", "is a built-in preset: save under another name"),
    ("../evil", "a preset name is 1 to 64"),
    ("", "a preset name is 1 to 64"),
])
def test_bad_preset_names_are_refused(tmp_path, name, message):
    with pytest.raises(BadRequestError, match=message):
        PresetStore(tmp_path / "user").save(name, SamplingParams())


def test_built_in_presets_cannot_be_deleted_and_broken_files_are_one_line_errors(tmp_path):
    user = tmp_path / "user"
    store = PresetStore(user)
    with pytest.raises(BadRequestError, match="built-in preset and cannot be deleted"):
        store.delete("Default")
    user.mkdir()
    (user / "typo.yaml").write_text("temprature: 0.5\n")
    (user / "range.yaml").write_text("top_p: 7\n")
    (user / "garbage.yaml").write_text("- [unclosed\n")
    with pytest.raises(BadRequestError, match="unknown parameters: temprature"):
        store.values("typo")
    with pytest.raises(BadRequestError, match="top_p: Input should be less than or equal to 1"):
        store.values("range")
    with pytest.raises(BadRequestError, match="preset 'garbage' cannot be read"):
        store.values("garbage")
    assert BUILTIN_PRESETS_DIR.is_dir()


def test_generation_config_supplies_the_models_defaults(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.6, "top_p": 0.95, "top_k": 5000, "repetition_penalty": 1.1, "eos_token_id": 2}))
    assert generation_config_defaults(folder) == {"temperature": 0.6, "top_p": 0.95, "repetition_penalty": 1.1}
    (folder / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.9}))
    assert generation_config_defaults(folder) == {"temperature": 0.0}
    (folder / "generation_config.json").write_text("{not json")
    assert generation_config_defaults(folder) == {}


def test_presets_apply_on_top_of_the_loaded_models_defaults(tmp_path):
    engine = engine_with(tmp_path, FakeLoader("Fake"))
    folder = hf_folder(engine.settings.models_dir, "m")
    (folder / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "repetition_penalty": 1.2}))
    assert engine.default_params() == SamplingParams()  # nothing loaded yet
    engine.load_model("m")
    assert engine.default_params().repetition_penalty == 1.2
    precise = engine.preset_params("Precise")
    assert (precise.temperature, precise.repetition_penalty, precise.top_k) == (0.3, 1.1, 20)
    assert engine.preset_params("Default").temperature == 0.6
    engine.close()


def test_a_pinned_prompt_format_is_used_remembered_and_undone(tmp_path):
    from loadstar.engine.chat.messages import ChatMessage
    from loadstar.engine.generation.requests import GenerationRequest

    engine = engine_with(tmp_path, FakeLoader("Fake"))
    hf_folder(engine.settings.models_dir, "m")
    engine.load_model("m")
    request = GenerationRequest(messages=(ChatMessage(role="user", content="hi"),))
    assert engine.preview(request).prompt == "<user>hi<assistant>"  # the fake model's own template
    assert engine.set_prompt_format("Zephyr").format.name == "Zephyr"
    assert engine.preview(request).prompt == "<|user|>\nhi</s>\n<|assistant|>\n"
    engine.load_model("m")  # a new load reads the remembered choice again
    assert engine.preview(request).format_name == "Zephyr"
    engine.set_prompt_format("auto")
    assert engine.preview(request).prompt == "<user>hi<assistant>"
    with pytest.raises(BadRequestError, match="unknown prompt format 'Nope'"):
        engine.set_prompt_format("Nope")
    engine.close()


def test_a_model_folders_system_message_is_used_when_the_chat_has_none(tmp_path):
    from loadstar.engine.chat.messages import ChatMessage
    from loadstar.engine.generation.requests import GenerationRequest

    engine = engine_with(tmp_path, FakeLoader("Fake"))
    folder = hf_folder(engine.settings.models_dir, "m")
    (folder / "loadstar.json").write_text(json.dumps({"system_message": "Be brief."}))
    engine.load_model("m")
    user = ChatMessage(role="user", content="hi")
    assert engine.preview(GenerationRequest(messages=(user,))).prompt == "<system>Be brief.<user>hi<assistant>"
    own = ChatMessage(role="system", content="Be long.")
    assert engine.preview(GenerationRequest(messages=(own, user))).prompt == "<system>Be long.<user>hi<assistant>"
    for broken in ("{not json", json.dumps({"system_message": ""}), json.dumps({"system_message": 3}),
                   json.dumps(["x"]), json.dumps({"system_message": "x" * 5000})):
        (folder / "loadstar.json").write_text(broken)
        assert model_system_message(folder) is None, broken
    engine.close()


def test_the_embedded_model_ships_its_cards_sampling_and_a_system_message(tmp_path):
    from loadstar.engine.models.default_model import DEFAULT_MODEL_SYSTEM_MESSAGE, place_default_model

    folder = place_default_model(tmp_path)
    assert generation_config_defaults(folder) == {"temperature": 0.2, "top_p": 0.9}
    assert model_system_message(folder) == DEFAULT_MODEL_SYSTEM_MESSAGE
    (folder / "loadstar.json").write_text(json.dumps({"system_message": "Mine."}))
    place_default_model(tmp_path)  # placing again keeps what the user edited
    assert model_system_message(folder) == "Mine."
