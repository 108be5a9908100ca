"""The web UI's handlers are plain functions over the engine: tested here without a browser."""

import time
from fnmatch import fnmatch

import pytest

from loadstar.engine.sampling import SamplingParams, parameter_specs
from loadstar.webui.chat_handlers import (
    ChatHandlers,
    TurnOptions,
    Who,
    new_state,
    sampling_from_values,
    stops_from_text,
)
from loadstar.webui.model_handlers import AUTO_LOADER, ModelHandlers
from loadstar.webui.streaming import only_changes
from tests.fakes import FakeLoader
from tests.folders import hf_folder
from tests.test_engine import engine_with

DEFAULTS = tuple(spec.default for spec in parameter_specs())
ME = Who(owner="me", user=None)


@pytest.fixture
def engine(tmp_path):
    engine = engine_with(tmp_path, FakeLoader("Fake", reason="fits"), FakeLoader("Other", can_load=False, reason="wrong format"))
    hf_folder(engine.settings.models_dir, "m")
    engine.load_model("m")
    yield engine
    engine.close()


def test_parameter_specs_come_from_the_sampling_model():
    specs = {spec.name: spec for spec in parameter_specs()}
    assert set(specs) == set(SamplingParams.model_fields)
    assert (specs["temperature"].minimum, specs["temperature"].maximum) == (0.0, 5.0)
    assert specs["seed"].default == -1 and specs["top_k"].step == 1
    assert specs["ban_eos"].kind is bool and specs["ban_eos"].minimum is None
    assert sampling_from_values(DEFAULTS).temperature == specs["temperature"].default


def test_every_mend_to_gradios_page_applies_to_the_installed_gradio():
    from loadstar.webui.frontend_fixes import MENDS, mended_assets

    mended = mended_assets()
    # A new Gradio: look at what the mends mend again (and measure: bench/NOTES.md).
    assert len(mended) == len({mend.pattern for mend in MENDS})
    for mend in MENDS:
        [body] = [body for name, body in mended.items() if fnmatch(name, mend.pattern)]
        assert mend.new.encode() in body


def test_stop_strings_text_is_one_per_line_with_escapes():
    assert stops_from_text("END\n\\nUser:\n\n  \n") == ("END", "\nUser:")


def last(updates):
    *_, final = updates
    return final


def test_send_streams_saves_and_keeps_history(engine):
    chat = ChatHandlers(engine)
    updates = list(chat.send("hello there", new_state(), ME, DEFAULTS, ""))
    final = updates[-1]
    assert final.state["messages"][0] == {"role": "user", "content": "hello there"}
    assert final.state["messages"][-1]["role"] == "assistant" and "hello" in final.state["messages"][-1]["content"]
    assert final.chatbot == final.state["messages"] and final.status.startswith("Done (")
    assert final.prompt == "<user>hello there<assistant>"
    assert len(updates) > 3  # streamed in pieces
    saved = engine.conversations.load(None, final.state["id"])
    assert [m.content for m in saved.messages] == [m["content"] for m in final.state["messages"]]
    assert saved.title == "hello there"


def test_empty_message_changes_nothing(engine):
    state = {**new_state(), "messages": [{"role": "user", "content": "x"}]}
    [update] = list(ChatHandlers(engine).send("  ", state, ME, DEFAULTS, ""))
    assert update.state == state and update.status == "Type a message first."


def test_out_of_range_parameter_is_reported_not_raised(engine):
    values = list(DEFAULTS)
    values[0] = 99  # temperature
    assert last(ChatHandlers(engine).send("hi", new_state(), ME, tuple(values), "")).status.startswith("⚠️ temperature:")


def test_regenerate_continue_remove_and_edit(engine):
    chat = ChatHandlers(engine)
    state = last(chat.send("one two", new_state(), ME, DEFAULTS, "")).state
    again = last(chat.regenerate(state, ME, DEFAULTS, "")).state
    assert len(again["messages"]) == 2 and again["messages"][0] == state["messages"][0]
    assert "Nothing to regenerate" in last(chat.regenerate(new_state(), ME, DEFAULTS, "")).status
    longer = last(chat.continue_(again, ME, DEFAULTS, "")).state
    reply = longer["messages"][-1]["content"]
    assert len(longer["messages"]) == 2 and reply.startswith(again["messages"][-1]["content"]) and len(reply) > len(again["messages"][-1]["content"])
    edited = last(chat.edit(longer, ME, 0, [{"type": "text", "text": "three four"}], DEFAULTS, "")).state
    assert edited["messages"][0]["content"] == "three four"
    assert "cannot be empty" in last(chat.edit(edited, ME, 0, "  ")).status
    removed = chat.remove_last(edited, ME).state
    assert removed["messages"] == [] and engine.conversations.load(None, removed["id"]).messages == []


def test_system_message_and_prompt_preview(engine):
    chat = ChatHandlers(engine)
    prompt, info = chat.preview("hi", {**new_state(), "system": "be brief"}, DEFAULTS, "")
    assert prompt == "<system>be brief<user>hi<assistant>" and info.startswith("2 tokens, model's own format")
    # the fake model's context is 100 tokens, less 512 for the reply: the prompt would be cut
    assert "was cut to its last 1 tokens to fit the context" in info
    values = list(DEFAULTS)
    values[[s.name for s in parameter_specs()].index("top_k")] = 5
    values[0] = 1.0
    _, info = chat.preview("hi", new_state(), tuple(values), "")
    assert "Fake ignores top_k" in info


def test_stop_with_nothing_running(engine):
    assert ChatHandlers(engine).stop("me") == "Nothing is running."


def test_stop_leaves_the_status_to_the_stopped_reply(engine):
    """Stop writes no "Stopping…": it could reach the page after the reply's own "Stopped" and stay."""
    with engine.models.local() as model:
        model.delay = 0.05
    chat = ChatHandlers(engine)
    updates = chat.send("one two three four five six seven eight nine ten", new_state(), ME, DEFAULTS, "")
    next(updates)  # the user's message is shown; the reply is on its way
    assert chat.stop("me") is None
    assert last(updates).status.startswith("Stopped")


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
    status = list(models.load("hollow", AUTO_LOADER))[-1]
    assert status.startswith("⚠️ hollow holds no weight files") and "Loaded: **m**" in status
    assert models.describe("../etc", AUTO_LOADER)[0].startswith("⚠️ '../etc' is not a model folder name")
    assert list(models.load(None, AUTO_LOADER)) == ["⚠️ Pick a model first."]
    assert models.unload() == "Model unloaded." and models.unload() == "No model was loaded."


def test_loading_says_what_is_loading_while_it_loads(tmp_path):
    slow = engine_with(tmp_path, FakeLoader("Slow", reason="fits", load_seconds=1.5))
    try:
        hf_folder(slow.settings.models_dir, "big")
        lines = list(ModelHandlers(slow).load("big", AUTO_LOADER))
        assert lines[0].startswith("⏳ Loading **big** with Slow… 0 s")
        assert any("… 1 s" in line for line in lines)  # the seconds count while it loads
        assert lines[-1].startswith("Loaded: **big** with Slow")
    finally:
        slow.close()


def test_a_message_sent_while_answering_stays_in_the_textbox(engine):
    from loadstar.engine.generation.requests import GenerationRequest

    with engine.models.local() as model:
        model.delay = 0.05
    handle = engine.submit(GenerationRequest(prompt="a b c d e f g h", owner="me"))
    try:
        [update] = list(ChatHandlers(engine).send("second", new_state(), ME, DEFAULTS, ""))
        assert update.keep_input and update.state["messages"] == [] and "press Stop first" in update.status
    finally:
        handle.cancel()


def test_loader_options_send_only_the_chosen_loaders_changed_values():
    import gradio as gr

    from loadstar.loaders.autogptq_loader import AutoGPTQLoader
    from loadstar.loaders.llamacpp_loader import LlamaCppLoader
    from loadstar.webui.loader_options import build_loader_options

    with gr.Blocks():
        panel = build_loader_options({"llama.cpp": LlamaCppLoader(), "AutoGPTQ": AutoGPTQLoader()})
    llama, gptq = panel.groups
    assert llama.fields[:2] == ["n_ctx", "n_threads"] and "scratch_dir" not in gptq.fields
    assert "allow_pt" not in gptq.fields  # it has a control of its own
    values = [*llama.defaults, *gptq.defaults]
    values[llama.fields.index("n_ctx")] = 1024.0  # number boxes give floats
    values[len(llama.fields) + gptq.fields.index("backend")] = "gptq_torch_fused"
    assert panel.options("llama.cpp", values) == {"n_ctx": 1024}
    assert panel.options("AutoGPTQ", values) == {"backend": "gptq_torch_fused"}
    assert panel.options("Transformers", values) == {}
    shown = panel.show("AutoGPTQ", {"backend": "dense_float32"})
    assert [u["visible"] for u in shown[:2]] == [False, True]
    assert shown[2 + len(llama.fields) + gptq.fields.index("backend")]["value"] == "dense_float32"


def test_regenerate_keeps_versions_and_switching_picks_one(engine):
    chat = ChatHandlers(engine)
    first = last(chat.send("hello there", new_state(), ME, DEFAULTS, ""))
    state = {**first.state, "messages": [*first.state["messages"][:-1], {"role": "assistant", "content": "v1"}]}
    second = last(chat.regenerate(state, ME, DEFAULTS, ""))
    assert second.state["alternatives"] == {1: ["v1", second.state["messages"][1]["content"]]}
    assert "Reply 2/2 (‹ and › under it switch)." in second.status
    back = chat.switch_reply(second.state, ME, -1)
    assert back.state["messages"][1]["content"] == "v1" and back.status.startswith("Reply 1/2")
    saved = engine.conversations.load(None, back.state["id"])
    assert saved.messages[1].content == "v1" and saved.alternatives[1][0] == "v1"
    assert chat.switch_reply(back.state, ME, -1).status.startswith("Reply 1/2")  # stays at the first


def test_reasoning_is_collapsed_for_display_and_restored_for_an_edit():
    from loadstar.webui.message_display import displayed
    from loadstar.webui.reasoning import reasoning_source, show_reasoning

    text = "<think>\nIs it Lyon? No: <b>Paris</b> & co.\n</think>\n\nThe capital is Paris."
    shown = show_reasoning(text)
    assert shown.startswith('<details class="reasoning"><summary>Reasoning</summary>')
    assert "&lt;b&gt;Paris&lt;/b&gt; &amp; co." in shown and shown.endswith("</details>\n\nThe capital is Paris.")
    assert reasoning_source(shown) == "<think>Is it Lyon? No: <b>Paris</b> & co.</think>\nThe capital is Paris."
    streaming = show_reasoning("<think>Still thinking")  # no end yet: open, marked as going on
    assert streaming.startswith('<details class="reasoning" open><summary>Reasoning…</summary>')
    assert show_reasoning("No reasoning here.") == "No reasoning here."
    messages = [{"role": "user", "content": "<think>mine</think>"}, {"role": "assistant", "content": text}]
    assert displayed(messages)[0] == messages[0]  # only the model's reasoning is folded
    assert displayed(messages)[1]["content"] == shown


def test_a_streamed_redraw_sends_only_the_outputs_that_changed():
    import gradio as gr

    history, grown, state = [{"role": "user", "content": "hi"}], [{"role": "user", "content": "hi"}], {"id": "c"}

    @only_changes
    def stream():
        yield "", history, state, "Generating…"
        yield "", grown, state, "Generating…"  # an equal chat, but a new list: sent
        yield "", grown, {"id": "c"}, "Done"  # an equal state, but a new one: sent

    first, second, third = list(stream())
    assert first == ["", history, state, "Generating…"]
    assert second == [gr.skip(), grown, gr.skip(), gr.skip()]
    assert third[:2] == [gr.skip(), gr.skip()] and third[2] == {"id": "c"} and third[3] == "Done"


def test_a_double_click_on_run_it_runs_the_tool_once(tmp_path):
    """Two decisions on one waiting call (a double click: each with the page's copy of the
    conversation) run its tool once; the second is told it was answered already."""
    import threading

    from loadstar import Tool, hookimpl
    from loadstar.engine.facade import Engine
    from loadstar.engine.plugins.host import PluginHost
    from loadstar.engine.settings import Settings
    from tests.helpers import run_concurrently

    runs, both_in = [], threading.Barrier(2, timeout=30)

    class Oven:
        @hookimpl
        def register_tools(self, register):
            register(Tool("bake", "Bakes a cake.", lambda arguments: runs.append(1) or "baked"))

    host = PluginHost([], builtin_extensions=False)
    host.register(Oven(), name="oven")
    engine = Engine(Settings(models_dir=tmp_path / "models", data_dir=tmp_path / "data"), plugins=host)
    try:
        chat = ChatHandlers(engine)
        waiting = {**new_state(), "messages": [
            {"role": "user", "content": "Bake a cake."},
            {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "name": "bake", "arguments": "{}"}]}]}

        def click(_):
            both_in.wait()  # the two clicks arrive together
            return [update.status for update in chat.decide(waiting, ME, DEFAULTS, "", "approve")]

        statuses = run_concurrently(click, [1, 2], timeout=60)
        assert len(runs) == 1, statuses
        assert sum("These tool calls were answered already." in s for s in statuses.values()) == 1, statuses
        again = [u.status for u in chat.decide(waiting, ME, DEFAULTS, "", "reject")]  # a late click, too
        assert again == ["These tool calls were answered already."] and len(runs) == 1
    finally:
        engine.close()


def test_an_edited_question_is_answered_at_once_and_the_old_answer_stays_a_version(engine):
    chat = ChatHandlers(engine)
    first = last(chat.send("one two", new_state(), ME, DEFAULTS, "")).state
    old_answer = first["messages"][1]["content"]
    stats = first["reply_stats"][1]
    made = next(iter(stats.values()))
    assert made["tokens"] > 0 and made["end"] in ("stop", "length")
    updates = list(chat.edit(first, ME, 0, "three four five", DEFAULTS, ""))
    assert updates[0].running and not updates[-1].running  # Send shows as Stop while it answers
    edited = updates[-1].state
    assert [m["role"] for m in edited["messages"]] == ["user", "assistant"]
    assert edited["messages"][0]["content"] == "three four five"
    assert edited["alternatives"][1][0] == old_answer and edited["messages"][1]["content"] != old_answer
    saved = engine.conversations.load(None, edited["id"])
    assert saved.alternative(1) == (1, 2) and saved.stats(1) is not None
    back = chat.switch_reply(edited, ME, -1, index=1)  # the version switcher under that reply
    assert back.state["messages"][1]["content"] == old_answer and back.status.startswith("Reply 1/2")
    assert engine.conversations.load(None, edited["id"]).stats(1).tokens == made["tokens"]
    assert chat.switch_reply(back.state, ME, 1, index=0).status == "That reply no longer exists."


def test_a_reply_cut_off_by_the_page_leaving_is_kept_marked_interrupted(engine):
    chat = ChatHandlers(engine)
    updates = chat.send("one two three four", new_state(), ME, DEFAULTS, "")
    for update in updates:
        if update.chatbot and update.chatbot[-1]["role"] == "assistant" and update.chatbot[-1]["content"]:
            break
    updates.close()  # what Gradio does when the page goes away
    saved = engine.conversations.load(None, update.state["id"])
    assert saved.messages[-1].role == "assistant" and saved.messages[-1].content
    assert saved.stats(len(saved.messages) - 1).end == "interrupted"


def test_a_message_that_cannot_be_answered_is_refused_before_it_is_saved(engine):
    chat = ChatHandlers(engine)
    refused = last(chat.send("roll a die", new_state(), ME, DEFAULTS, "", TurnOptions(tools="auto")))
    # the fake model's own template reads no tools: said before anything is saved, the text kept
    assert refused.keep_input and refused.state["messages"] == [] and "takes no tools" in refused.status
    assert chat.refusal("off") is None
    engine.unload_model()
    refused = last(chat.send("anyone there?", new_state(), ME, DEFAULTS, ""))
    assert refused.keep_input and refused.state["messages"] == [] and "No model is loaded" in refused.status
    assert "Model" in refused.status and engine.conversations.summaries(None) == []


def test_a_character_opens_the_chat_with_its_greeting_and_is_who_the_model_is(engine):
    from loadstar.engine.chat.characters import Character

    chat = ChatHandlers(engine)
    ada = engine.characters.save(None, Character(name="Ada Byron", greeting="Hello {{user}}, I am {{char}}.",
                                                 context="{{char}} is a mathematician."))
    assert ada.id == "ada-byron"
    picked = chat.pick_character(new_state(), ME, ada.id)
    assert picked.state["character"] == "ada-byron"
    assert picked.state["messages"] == [{"role": "assistant", "content": "Hello You, I am Ada Byron."}]
    prompt, _ = chat.preview("hi", picked.state, DEFAULTS, "")
    assert prompt.startswith("<system>Ada Byron is a mathematician.<assistant>Hello You")
    answered = last(chat.send("hi", picked.state, ME, DEFAULTS, "")).state
    assert engine.conversations.load(None, answered["id"]).character == "ada-byron"
    other = chat.pick_character(answered, ME, None)  # a begun conversation stays as it is
    assert other.state["id"] != answered["id"] and other.state["messages"] == []


def test_a_queue_position_and_the_start_wait_for_the_first_text_unless_it_is_slow():
    import threading

    from loadstar.engine.generation.handle import GenerationHandle
    from loadstar.engine.generation.requests import Finished, GenerationRequest, Queued, Started, TextDelta
    from loadstar.webui.streaming import redraws

    def handle():
        return GenerationHandle(GenerationRequest(prompt="x"), 1, lambda _h: None)

    started = Started(model="m", prompt="x", prompt_tokens=1, seed=1)
    quick = handle()
    for event in (Queued(1), started, TextDelta("Hi"), Finished(reason="stop", text="Hi")):
        quick.emit(event)
    kinds = [type(r.event).__name__ for r in redraws(quick, hold=5.0)]
    # held while the prompt was read, then sent just before the first text (a position passed is not)
    assert kinds == ["Started", "TextDelta", "Finished"]

    slow = handle()
    slow.emit(Queued(2))
    seen = []

    def late():
        time.sleep(0.6)
        slow.emit(Queued(1))
        slow.emit(Finished(reason="stop", text=""))

    threading.Thread(target=late).start()
    began = time.monotonic()
    for redraw in redraws(slow, hold=0.2):
        seen.append((type(redraw.event).__name__, round(time.monotonic() - began, 1)))
    assert seen[0][0] == "Queued" and 0.15 <= seen[0][1] < 0.5  # a wait that lasts is shown, after the hold
    assert [kind for kind, _ in seen] == ["Queued", "Queued", "Finished"]


def test_a_reply_from_a_cpu_model_is_redrawn_less_often_than_one_from_a_gpu():
    from loadstar.engine.models.loader_api import LoadedModelInfo
    from loadstar.webui.streaming import CPU_UPDATE_INTERVAL, UPDATE_INTERVAL, update_interval

    def on(device):
        return LoadedModelInfo(name="m", loader="llama.cpp", device=device, dtype="q4_1", context_length=8192)

    # the browser shares a CPU model's cores: each redraw (about 20 ms of CPU) is taken from the model
    assert update_interval(on("cpu")) == update_interval(None) == CPU_UPDATE_INTERVAL
    assert update_interval(on("cuda")) == update_interval(on("cuda:1")) == UPDATE_INTERVAL < CPU_UPDATE_INTERVAL
