"""The Model tab: pick, inspect, load and unload models; download from the Hub."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gradio as gr

from loadstar.engine.facade import Engine
from loadstar.webui.download_handlers import BRANCH_COLUMNS, DownloadHandlers
from loadstar.webui.loader_options import build_loader_options
from loadstar.webui.model_handlers import AUTO_LOADER, ModelHandlers


def build_model_tab(engine: Engine, demo: gr.Blocks, after_load: Callable[[Any], Any], models: ModelHandlers) -> None:
    """``after_load(event)`` chains what must follow a model loaded, reloaded or unloaded."""
    downloads = DownloadHandlers(engine)
    loaded = gr.Markdown(models.loaded_status(), elem_id="model-status")
    with gr.Row():
        model_choice = gr.Dropdown(
            choices=models.model_names(), value=models.initial_model(), label="Model",
            elem_id="model-choice", allow_custom_value=False, scale=3,
        )
        refresh_button = gr.Button("Refresh", elem_id="refresh-models", scale=1)
        loader_choice = gr.Dropdown(
            choices=models.loader_choices(), value=AUTO_LOADER, label="Loader",
            info="auto = the best candidate below", elem_id="loader-choice", scale=2,
        )
    allow_pt = gr.Checkbox(
        False, label="Allow .pt weights",
        info="Pickled .pt files can carry code: allow only for sources you trust (read with weights_only).",
        elem_id="allow-pt",
    )
    with gr.Row():
        load_button = gr.Button("Load", variant="primary", elem_id="load-model")
        reload_button = gr.Button("Reload", elem_id="reload-model")
        unload_button = gr.Button("Unload", elem_id="unload-model")
        cancel_load = gr.Button("Cancel load", variant="stop", elem_id="cancel-load", interactive=False)  # during a load
    with gr.Accordion("Loader options", open=False, elem_id="loader-options"):
        gr.Markdown("For the loader that Load will use; the model remembers them for its next load.")
        options_panel = build_loader_options(engine.loaders())
    estimate = gr.Markdown(elem_id="memory-estimate")
    details = gr.Markdown(elem_id="model-details")
    gr.Markdown("### Loader candidates")
    candidates = gr.Markdown(elem_id="loader-candidates")
    gr.Markdown("### Download from the Hugging Face Hub")
    with gr.Row():
        download_name = gr.Textbox(label="Model", placeholder="org/repo or org/repo:branch", elem_id="download-name", scale=3)
        download_token = gr.Textbox(label="Token (gated or private repos)", type="password", elem_id="download-token", scale=2)
        gguf_file = gr.Textbox(label="GGUF file (repos with several)", elem_id="download-gguf", scale=2)
    with gr.Row():
        branches_button = gr.Button("List branches", elem_id="list-branches")
        download_button = gr.Button("Download", variant="primary", elem_id="start-download")
        cancel_download = gr.Button("Cancel download", variant="stop", elem_id="cancel-download",
                                    interactive=False)  # during a download
    # Progress right under the buttons, above the (possibly long) branch table.
    download_status = gr.Markdown(elem_id="download-status")
    download_bars = gr.HTML(elem_id="download-progress")
    branch_table = gr.Dataframe(headers=BRANCH_COLUMNS, interactive=False, elem_id="branch-table", wrap=True,
                                line_breaks=True, column_widths=["16%", "14%", "34%", "8%", "10%", "18%"])
    download_job = gr.State(None)
    download_timer = gr.Timer(0.5, active=False)

    # -- model wiring -------------------------------------------------------------------------
    def refresh():
        return gr.update(choices=models.model_names(), value=models.initial_model()), models.loaded_status()

    def describe(name, loader):
        folder, table, choices = models.describe(name, loader)
        value = loader if loader in {value for _, value in choices} else AUTO_LOADER
        shown = options_panel.show(models.resolved_loader(name, value), models.saved_options(name))
        return [folder, table, gr.update(choices=choices, value=value), *shown]

    def load(name, loader, allow_pt, *values):
        # The controls were filled with what the model was loaded with last time: send what they say.
        yield from models.load(name, loader, allow_pt, options_panel.options(models.resolved_loader(name, loader), values))

    def pick_model(name):
        return describe(name, models.saved_loader(name))  # restore this model's own choice

    def estimate_memory(name, loader, *values):
        chosen = models.resolved_loader(name, loader)
        return models.estimate(name, chosen, options_panel.options(chosen, values))

    describe_io = ([model_choice, loader_choice], [details, candidates, loader_choice, *options_panel.show_outputs])
    estimate_io = dict(fn=estimate_memory, inputs=[model_choice, loader_choice, *options_panel.components],
                       outputs=estimate)
    refresh_button.click(refresh, None, [model_choice, loaded]).then(describe, *describe_io).then(**estimate_io)
    model_choice.change(pick_model, [model_choice], describe_io[1]).then(**estimate_io)
    for control in options_panel.components:  # the estimate follows the options as they change
        control.input(**estimate_io)
    loader_choice.input(describe, *describe_io).then(**estimate_io)  # .input: user choices only, no update loop
    for button, action, inputs in (
        (load_button, load, [model_choice, loader_choice, allow_pt, *options_panel.components]),
        (reload_button, models.reload, None),
        (unload_button, models.unload, None),
    ):
        started = button.click(lambda: gr.update(interactive=True), None, cancel_load, queue=False,
                               show_progress="hidden")
        after_load(started.then(action, inputs, loaded)).then(lambda: gr.update(interactive=False), None, cancel_load,
                                                               show_progress="hidden")

    def cancel():
        return gr.update() if models.cancel_load() else f"Nothing is loading. {models.loaded_status()}"

    cancel_load.click(cancel, None, loaded, queue=False)  # never waits behind the load it cancels
    # Fresh on every page load, and whenever the list is opened: a model downloaded or removed from
    # another page (or the disk) shows without pressing Refresh.
    demo.load(refresh, None, [model_choice, loaded]).then(describe, *describe_io).then(**estimate_io)

    def fresh_choices():
        return gr.update(choices=models.model_names())

    model_choice.focus(fresh_choices, None, model_choice, queue=False)

    # -- download wiring ----------------------------------------------------------------------
    def pick_branch(name, gguf, event: gr.SelectData):
        row = event.row_value or []
        if not row:
            return name, gguf
        return downloads.name_for_branch(name, row[0]), downloads.gguf_for_row(row)

    def start_download(name, token, gguf):
        job_id, status = downloads.start(name, token, gguf)
        return job_id, status, gr.Timer(active=job_id is not None), gr.update(interactive=job_id is not None)

    def poll_download(job_id):
        status, bars, finished = downloads.poll(job_id)
        choices = gr.update(choices=models.model_names()) if finished else gr.update()
        return status, bars, gr.Timer(active=not finished), choices, gr.update(interactive=not finished)

    branches_button.click(downloads.branches, [download_name, download_token], [branch_table, download_status])
    branch_table.select(pick_branch, [download_name, gguf_file], [download_name, gguf_file])
    # A new name typed: the previous repo's branches no longer apply (.input: typing, not a picked row).
    download_name.input(lambda: [], None, branch_table, queue=False)
    download_button.click(start_download, [download_name, download_token, gguf_file],
                          [download_job, download_status, download_timer, cancel_download])
    download_timer.tick(poll_download, download_job,
                        [download_status, download_bars, download_timer, model_choice, cancel_download])
    cancel_download.click(downloads.cancel, download_job, download_status)
