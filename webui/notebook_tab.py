"""The Notebook tab: free text the model continues (no chat format), with Stop, Undo and a token count."""

from __future__ import annotations

import gradio as gr

from loadstar.engine.facade import Engine
from loadstar.webui.chat_tab import UNLIMITED, who
from loadstar.webui.notebook_handlers import NotebookHandlers
from loadstar.webui.parameters_tab import ParameterControls
from loadstar.webui.streaming import only_changes


def build_notebook_tab(engine: Engine, parameters: ParameterControls) -> None:
    notebook = NotebookHandlers(engine)
    text = gr.Textbox(label="Text", lines=18, max_lines=60, elem_id="notebook-text",
                      placeholder="Write the start of a text; Generate continues it.")
    with gr.Row():
        generate = gr.Button("Generate", variant="primary", elem_id="notebook-generate")
        stop = gr.Button("Stop", variant="stop", elem_id="notebook-stop")
        undo = gr.Button("Undo", elem_id="notebook-undo")
        count = gr.Button("Count tokens", elem_id="notebook-count")
    status = gr.Markdown(elem_id="notebook-status")
    before = gr.State("")

    def run(data, request: gr.Request):
        values, stops = parameters.read(data)
        yield from only_changes(notebook.generate)(data[text], who(request).owner, values, stops)

    def stop_(request: gr.Request):
        status = notebook.stop(who(request).owner)
        return gr.skip() if status is None else status  # the stopped generation says "Stopped" itself

    generate.click(run, {text, *parameters.inputs}, [text, status, before], concurrency_limit=UNLIMITED)
    stop.click(stop_, None, status, concurrency_limit=UNLIMITED)
    undo.click(lambda previous: (previous, "Undone."), before, [text, status])
    count.click(notebook.count, text, status)
