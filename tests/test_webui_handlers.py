"""The web UI's handlers are plain functions over the engine: tested here without a browser."""

import pytest

from engine.sampling import parameter_specs
from tests.fakes import FakeLoader
from tests.folders import hf_folder
from tests.test_engine import engine_with
from webui.chat_handlers import ChatHandlers, sampling_from_values
from webui.model_handlers import AUTO_LOADER, ModelHandlers

DEFAULTS = tuple(spec.default for spec in parameter_specs())


@pytest.fixture
def engine(tmp_path):
    engine = engine_with(tmp_path, FakeLoader("Fake", reason="fits"), FakeLoader("Other", can_load=False, reason="wrong format"))
    hf_folder(engine.settings.models_dir, "m")
    engine.load_model("m")
    yield engine
    engine.close()


def test_parameter_specs_come_from_the_sampling_model():
    specs = {spec.name: spec for spec in parameter_specs()}
    assert set(specs) == {"temperature", "top_p", "top_k", "max_new_tokens", "seed"}
    assert (specs["temperature"].minimum, specs["temperature"].maximum) == (0.0, 5.0)
    assert specs["seed"].default == -1 and specs["top_k"].step == 1
    assert sampling_from_values(DEFAULTS).temperature == specs["temperature"].default


def test_send_streams_and_keeps_history(engine):
    chat = ChatHandlers(engine)
    updates = list(chat.send("hello there", [], "me", *DEFAULTS))
    textbox, chatbot, history, status = updates[-1]
    assert textbox == ""
    assert history[0] == {"role": "user", "content": "hello there"}
    assert history[-1]["role"] == "assistant" and "hello" in history[-1]["content"]
    assert chatbot == history
    assert status.startswith("Done (")
    assert len(updates) > 3  # streamed in pieces


def test_empty_message_changes_nothing(engine):
    [(textbox, chatbot, history, status)] = list(ChatHandlers(engine).send("  ", [{"role": "user", "content": "x"}], "me", *DEFAULTS))
    assert history == [{"role": "user", "content": "x"}] and status == "Type a message first."


def test_out_of_range_parameter_is_reported_not_raised(engine):
    values = list(DEFAULTS)
    values[0] = 99  # temperature
    *_, (_, _, _, status) = ChatHandlers(engine).send("hi", [], "me", *values)
    assert status.startswith("⚠️ temperature:")


def test_regenerate_replaces_the_last_reply(engine):
    chat = ChatHandlers(engine)
    *_, (_, _, history, _) = chat.send("one two", [], "me", *DEFAULTS)
    *_, (_, again, _) = chat.regenerate(history, "me", *DEFAULTS)
    assert len(again) == 2 and again[0] == history[0]
    [(_, nothing, status)] = list(chat.regenerate([], "me", *DEFAULTS))
    assert nothing == [] and "Nothing to regenerate" in status


def test_stop_and_clear_with_nothing_running(engine):
    chat = ChatHandlers(engine)
    assert chat.stop("me") == "Nothing is running."
    assert chat.clear("me") == ([], [], "")


def test_model_handlers_describe_candidates_with_reasons(engine):
    models = ModelHandlers(engine)
    assert models.model_names() == ["m"]
    assert models.loader_choices() == [AUTO_LOADER, "Fake", "Other"]
    details, table, choices = models.describe("m", AUTO_LOADER)
    assert "**m** — LlamaForCausalLM, safetensors" in details
    assert "| Fake | can load | 50 | fits |" in table and "| Other | cannot load | – | wrong format |" in table
    assert choices[0] == ("auto → Fake", AUTO_LOADER)
    assert ("Other: cannot load, wrong format", "Other") in choices
    assert models.loaded_status().startswith("Loaded: **m** with Fake")


def test_model_handlers_report_errors_as_text(engine):
    models = ModelHandlers(engine)
    hf_folder(engine.settings.models_dir, "hollow", weights=())
    status = models.load("hollow", AUTO_LOADER)
    assert status.startswith("⚠️ hollow holds no weight files") and "Loaded: **m**" in status
    assert models.describe("../etc", AUTO_LOADER)[0].startswith("⚠️ '../etc' is not a model folder name")
    assert models.load(None, AUTO_LOADER) == "⚠️ Pick a model first."
    assert models.unload() == "Model unloaded." and models.unload() == "No model was loaded."
