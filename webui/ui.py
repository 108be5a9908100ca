"""The Gradio page: tabs wired to the handlers. ``build_ui`` returns the Blocks; nothing launches here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gradio as gr

from loadstar.engine.facade import Engine
from loadstar.webui.characters_tab import build_characters_tab
from loadstar.webui.chat_handlers import model_line, who
from loadstar.webui.chat_script import CHAT_SCRIPT
from loadstar.webui.chat_tab import ChatTab, build_chat_tab
from loadstar.webui.extensions_tab import build_contributions, build_extensions_tab, wire_extensions
from loadstar.webui.model_handlers import ModelHandlers
from loadstar.webui.model_tab import build_model_tab
from loadstar.webui.notebook_tab import build_notebook_tab
from loadstar.webui.parameters_tab import ParameterControls, build_parameters_tab
from loadstar.webui.preset_handlers import PresetHandlers
from loadstar.webui.remembered import (
    PAGE_SCRIPT,
    SIDEBAR_CLOSED,
    SIDEBAR_OPENED,
    browser_memory,
    parameters_to_remember,
    parameters_to_restore,
    remember,
    remembered,
)

TITLE = "Loadstar"
# Dark mode is the browser's choice, remembered in its localStorage and applied when the page opens.
TOGGLE_DARK = """() => {
    const dark = document.body.classList.toggle('dark');
    localStorage.setItem('loadstar-dark', dark ? '1' : '0');
}"""
# On a phone the chat fits the first screen (the conversations are in the sidebar, closed there).
CSS = """
#conversation-list .wrap { flex-direction: column; gap: 2px; }
#conversation-list label { width: 100%; margin: 0; }
#conversation-list input[type=radio] { display: none; }
#conversation-list label.selected { background: var(--color-accent-soft); border-color: var(--color-accent); }
#chat-header { align-items: center; }
#chatbot details.reasoning { color: var(--body-text-color-subdued); border-left: 3px solid var(--border-color-primary);
  padding-left: 8px; margin-bottom: 8px; font-size: 0.92em; }
#chatbot .edit-textarea { width: 100% !important; min-height: 4.5em; font: inherit; }
#chatbot .message-row:has(.edit-textarea), #chatbot .message-row:has(.edit-textarea) .flex-wrap,
#chatbot .message-row:has(.edit-textarea) .message { width: 100% !important; max-width: 100% !important; }
#chatbot .reply-meta { display: flex; flex-wrap: wrap; gap: 4px 12px; align-items: center; margin-top: 6px;
  font-size: 0.8em; color: var(--body-text-color-subdued); }
#chatbot .reply-meta .versions { display: inline-flex; align-items: center; gap: 2px; font-variant-numeric: tabular-nums; }
#chatbot .reply-meta .versions button { border: none; background: none; cursor: pointer; padding: 0 6px;
  font-size: 1.25em; line-height: 1; color: var(--body-text-color); }
#chatbot .reply-meta .versions button.ls-off { opacity: 0.3; cursor: default; }
#chatbot .reply-meta .ending { font-style: italic; }
#chatbot .speaker { display: flex; align-items: center; gap: 8px; margin-bottom: 2px; }
#chatbot .speaker-picture { width: 32px; height: 32px; border-radius: 50%; background-size: cover;
  background-position: center; display: inline-block; flex: none; }
#character-style { display: none; }
#chat-status { position: relative; }
#chat-status:has(p) { background: var(--background-fill-secondary); border: 1px solid var(--border-color-primary);
  border-radius: 8px; padding: 4px 36px 4px 10px; }
#chat-status:has(p)::after { content: "×"; position: absolute; right: 12px; top: 50%; transform: translateY(-50%);
  cursor: pointer; font-size: 1.3em; color: var(--body-text-color-subdued); }
#chat-status.ls-dismissed { display: none !important; }
#chat-buttons button:disabled { opacity: 0.45; cursor: default; }
.load-bar { width: 100%; height: 10px; accent-color: var(--color-accent); }
.download-bar { display: flex; flex-direction: column; margin: 4px 0; }
.download-bar progress { width: 100%; height: 14px; accent-color: var(--color-accent); }
@media (max-width: 768px) {
  #chat-header { flex-wrap: wrap; gap: 6px; }
  #chat-model { font-size: 0.8rem; flex: 1 1 100% !important; min-width: 100% !important; }
  #chat-model-switch, #chat-character { flex: 1 1 0 !important; min-width: 0 !important; }
  #chat-model-switch input, #chat-character input { text-overflow: ellipsis; padding-right: 22px; }
  /* every tab on the first line: Gradio measures the tabs that fit with copies of the buttons */
  .tab-wrapper button, button[role=tab] { padding-inline: 5px !important; font-size: 0.8rem !important; }
  #app-header { padding-inline: 26px; }  /* the two sidebars' toggles sit at the screen's edges */
  #dark-mode { min-width: 0 !important; font-size: 0 !important; padding-inline: 10px !important; }
  #dark-mode::before { content: "🌓"; font-size: 1rem; }
  #chat-status:has(p) { max-height: 3.2em; overflow: hidden; }
  #chatbot { height: 46vh !important; min-height: 240px; }
  /* wide tables scroll sideways instead of squeezing a word to a letter per line */
  #loader-candidates table { display: block; overflow-x: auto; }
  #loader-candidates td, #loader-candidates th { min-width: 90px; }
  #loader-candidates td:last-child { min-width: 220px; }
  #branch-table table, #plugin-table table { min-width: 680px; }
  #chat-buttons { flex-wrap: nowrap; gap: 4px; }
  #chat-buttons button { min-width: 0 !important; flex: 1 1 auto; white-space: nowrap; font-size: 0.78rem !important;
    padding-inline: 6px !important; }
}
"""

# Gradio scopes ``CSS`` to the page's content; the page's own margins are outside it (``HEAD``).
HEAD = """<style>
@media (max-width: 768px) { .main.fillable { padding-left: 12px !important; padding-right: 12px !important; } }
</style>"""


def build_ui(engine: Engine) -> gr.Blocks:
    models = ModelHandlers(engine)
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        memory = browser_memory()
        with gr.Row(equal_height=True, elem_id="app-header"):
            gr.Markdown(f"## {TITLE}")
            dark = gr.Button("🌓 Dark mode", size="sm", elem_id="dark-mode", scale=0, min_width=130)
        dark.click(None, js=TOGGLE_DARK)
        # Beside the chat (and the notebook): a panel on the right on a desktop, a sheet on a phone.
        with gr.Sidebar(open=False, position="right", width=380, label="Parameters", elem_id="parameters-panel"):
            gr.Markdown("### Parameters", elem_id="parameters-title")
            parameters = build_parameters_tab(engine)
        with gr.Tab("Chat", id="chat"):
            chat = build_chat_tab(engine)
        with gr.Tab("Notebook", id="notebook"):
            notebook_slot = gr.Column()
        with notebook_slot:
            build_notebook_tab(engine, parameters)

        def model_views(request: gr.Request):
            """What shows the loaded model elsewhere: its parameter defaults, the chat's model line
            and switch, the system message's placeholder."""
            refresh = parameters.refresh
            assert refresh is not None  # build_parameters_tab sets it
            return [*refresh(request), *chat_model_views(engine, models)]

        model_outputs = [*parameters.refresh_outputs, chat.model, chat.model_switch, chat.system]

        def after_model_change(dependency):
            return dependency.then(model_views, None, model_outputs)

        with gr.Tab("Model", id="model"):
            build_model_tab(engine, demo, after_model_change, models)
        with gr.Tab("Characters", id="characters"):
            characters = build_characters_tab(engine)
        with gr.Tab("Extensions", id="extensions"):
            extensions = build_extensions_tab(engine)
        shared = {"chatbot": chat.chatbot, "conversation": chat.state, "chat_status": chat.status,
                  "message": chat.message}
        containers = build_contributions(engine, "tab", shared)
        with chat.panels:
            containers += build_contributions(engine, "panel", shared)
        chat.wire(demo, parameters, memory)
        characters.wire(demo, chat)
        wire_extensions(engine, demo, extensions, containers)
        wire_model_switch(chat, models, after_model_change)
        wire_remembered_parameters(engine, parameters, memory, demo.load(model_views, None, model_outputs))
        demo.load(None, js=PAGE_SCRIPT)
        demo.load(None, js=CHAT_SCRIPT)
        chat.sidebar.expand(None, js=SIDEBAR_OPENED)
        chat.sidebar.collapse(None, js=SIDEBAR_CLOSED)
    return demo


def chat_model_views(engine: Engine, models: ModelHandlers) -> list[Any]:
    """The model line above the chat, the switch beside it, and the system message's placeholder."""
    loaded = engine.loaded
    chosen = engine.loaded_prompt_format()
    default = chosen.system_message if chosen else None
    placeholder = f"Empty: the model's default ({default})" if default else "Empty: the model's default, if it has one"
    return [model_line(engine), gr.update(choices=models.model_names(), value=loaded.name if loaded else None),
            gr.update(placeholder=placeholder)]


def wire_model_switch(chat: ChatTab, models: ModelHandlers, after_model_change: Callable[[Any], Any]) -> None:
    """The dropdown beside the model line loads another model (as it was loaded last time)."""
    def switch(name):
        yield from models.load(name, None)

    chat.model_switch.focus(lambda: gr.update(choices=models.model_names()), None, chat.model_switch, queue=False)
    after_model_change(chat.model_switch.input(switch, chat.model_switch, chat.status))


def wire_remembered_parameters(engine: Engine, parameters: ParameterControls, memory: Any, page_opened: Any) -> None:
    """The parameters a browser set by hand or by a preset come back when it opens the page again
    (``page_opened``: the event that shows the model's defaults; the kept values go on top). They
    are kept for the model they were set with: after another model is loaded, its defaults show."""
    presets = PresetHandlers(engine)

    def loaded_name() -> str | None:
        loaded = engine.loaded
        return loaded.name if loaded else None

    def keep(memory_value, preset, *values):
        return remember(memory_value, parameters=parameters_to_remember(values[:-1], values[-1]), preset=preset,
                        parameters_model=loaded_name())

    def restore(memory_value, request: gr.Request):
        saved = parameters_to_restore(remembered(memory_value, "parameters"))
        if saved is None or remembered(memory_value, "parameters_model") != loaded_name():
            return [gr.update()] * (len(parameters.inputs) + 1)
        values, stops = saved
        preset = remembered(memory_value, "preset")
        known = preset in presets.names(who(request).user)  # a preset deleted since is not picked
        return [*values, stops, preset if known else gr.update()]

    keep_io = dict(fn=keep, inputs=[memory, parameters.preset, *parameters.inputs], outputs=memory)
    for control in parameters.inputs:
        control.input(**keep_io)
    parameters.preset_loaded.then(**keep_io)
    page_opened.then(restore, memory, [*parameters.inputs, parameters.preset])
