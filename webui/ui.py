"""The Gradio page: tabs wired to the handlers. ``build_ui`` returns the Blocks; nothing launches here."""

from __future__ import annotations

import gradio as gr

from engine.engine import Engine
from webui.chat_tab import build_chat_tab
from webui.extensions_tab import build_contributions, build_extensions_tab, wire_extensions
from webui.model_tab import build_model_tab
from webui.notebook_tab import build_notebook_tab
from webui.parameters_tab import build_parameters_tab

TITLE = "Loadstar"


def build_ui(engine: Engine) -> gr.Blocks:
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(f"## {TITLE}")
        with gr.Tab("Chat", id="chat"):
            chat = build_chat_tab(engine)
        with gr.Tab("Notebook", id="notebook"):
            notebook_slot = gr.Column()
        with gr.Tab("Parameters", id="parameters"):
            parameters = build_parameters_tab(engine)
        with notebook_slot:
            build_notebook_tab(engine, parameters)
        with gr.Tab("Model", id="model"):
            build_model_tab(engine, demo, (parameters.refresh, parameters.refresh_outputs))
        with gr.Tab("Extensions", id="extensions"):
            extensions = build_extensions_tab(engine)
        shared = {"chatbot": chat.chatbot, "conversation": chat.state, "chat_status": chat.status,
                  "message": chat.message}
        containers = build_contributions(engine, "tab", shared)
        with chat.panels:
            containers += build_contributions(engine, "panel", shared)
        chat.wire(demo, parameters)
        wire_extensions(engine, demo, extensions, containers)
        demo.load(parameters.refresh, None, parameters.refresh_outputs)
    return demo
