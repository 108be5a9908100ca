"""The Gradio page: tabs wired to the handlers. ``build_ui`` returns the Blocks; nothing launches here."""

from __future__ import annotations

import gradio as gr

from engine.engine import Engine
from webui.chat_handlers import model_line
from webui.chat_tab import build_chat_tab
from webui.extensions_tab import build_contributions, build_extensions_tab, wire_extensions
from webui.model_tab import build_model_tab
from webui.notebook_tab import build_notebook_tab
from webui.parameters_tab import build_parameters_tab

TITLE = "Loadstar"
# Dark mode is the browser's choice, remembered in its localStorage and applied when the page opens.
TOGGLE_DARK = """() => {
    const dark = document.body.classList.toggle('dark');
    localStorage.setItem('loadstar-dark', dark ? '1' : '0');
}"""
# On a phone the chat comes first and fits the screen; the conversation list follows it.
CSS = """
@media (max-width: 768px) {
  #chat-row { flex-direction: column-reverse !important; }
  #chatbot { height: 52vh !important; min-height: 260px; }
  #send, #stop, #regenerate, #continue, #remove-last { font-size: 0.85rem !important; padding-inline: 4px !important; }
}
"""
APPLY_DARK = """() => {
    const saved = localStorage.getItem('loadstar-dark');
    if (saved !== null) document.body.classList.toggle('dark', saved === '1');
}"""


def build_ui(engine: Engine) -> gr.Blocks:
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        with gr.Row(equal_height=True):
            gr.Markdown(f"## {TITLE}")
            dark = gr.Button("🌓 Dark mode", size="sm", elem_id="dark-mode", scale=0, min_width=130)
        dark.click(None, js=TOGGLE_DARK)
        with gr.Tab("Chat", id="chat"):
            chat = build_chat_tab(engine)
        with gr.Tab("Notebook", id="notebook"):
            notebook_slot = gr.Column()
        with gr.Tab("Parameters", id="parameters"):
            parameters = build_parameters_tab(engine)
        with notebook_slot:
            build_notebook_tab(engine, parameters)
        def after_model_change(request: gr.Request):
            """What shows the loaded model elsewhere: its parameter defaults, and the chat's model line."""
            return [*parameters.refresh(request), model_line(engine)]

        model_outputs = [*parameters.refresh_outputs, chat.model]
        with gr.Tab("Model", id="model"):
            build_model_tab(engine, demo, (after_model_change, model_outputs))
        with gr.Tab("Extensions", id="extensions"):
            extensions = build_extensions_tab(engine)
        shared = {"chatbot": chat.chatbot, "conversation": chat.state, "chat_status": chat.status,
                  "message": chat.message}
        containers = build_contributions(engine, "tab", shared)
        with chat.panels:
            containers += build_contributions(engine, "panel", shared)
        chat.wire(demo, parameters)
        wire_extensions(engine, demo, extensions, containers)
        demo.load(after_model_change, None, model_outputs)
        demo.load(None, js=APPLY_DARK)
    return demo
