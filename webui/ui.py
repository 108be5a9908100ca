"""The Gradio page: tabs wired to the handlers. ``build_ui`` returns the Blocks; nothing launches here."""

from __future__ import annotations

import gradio as gr

from engine.engine import Engine
from engine.sampling import parameter_specs
from webui.chat_handlers import ChatHandlers
from webui.download_handlers import BRANCH_COLUMNS, DownloadHandlers
from webui.model_handlers import AUTO_LOADER, ModelHandlers

TITLE = "Loadstar"
# Chat events run concurrently in Gradio; the engine's own queue orders generation fairly and
# reports positions, and Stop must never wait behind a running reply.
UNLIMITED = None


def _owner(request: gr.Request) -> str:
    return request.session_hash or "anonymous"


def build_ui(engine: Engine) -> gr.Blocks:
    chat = ChatHandlers(engine)
    models = ModelHandlers(engine)
    downloads = DownloadHandlers(engine)

    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(f"## {TITLE}")
        history = gr.State([])
        with gr.Tab("Chat", id="chat"):
            chatbot = gr.Chatbot(label="Chat", height=460, elem_id="chatbot", buttons=["copy"], feedback_options=None)
            message = gr.Textbox(
                label="Message", placeholder="Type a message and press Enter", lines=2, elem_id="chat-input"
            )
            with gr.Row():
                send_button = gr.Button("Send", variant="primary", elem_id="send")
                stop_button = gr.Button("Stop", variant="stop", elem_id="stop")
                regenerate_button = gr.Button("Regenerate", elem_id="regenerate")
                clear_button = gr.Button("Clear", elem_id="clear")
            chat_status = gr.Markdown("", elem_id="chat-status")

        with gr.Tab("Parameters", id="parameters"):
            param_inputs = []
            for spec in parameter_specs():
                if spec.name == "seed":
                    control = gr.Number(
                        value=spec.default, label=spec.label, info=spec.description, precision=0,
                        minimum=spec.minimum, maximum=spec.maximum, elem_id=f"param-{spec.name}",
                    )
                else:
                    control = gr.Slider(
                        minimum=spec.minimum, maximum=spec.maximum, step=spec.step, value=spec.default,
                        label=spec.label, info=spec.description, elem_id=f"param-{spec.name}",
                    )
                param_inputs.append(control)

        with gr.Tab("Model", id="model"):
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
            details = gr.Markdown(elem_id="model-details")
            gr.Markdown("### Loader candidates")
            candidates = gr.Markdown(elem_id="loader-candidates")
            gr.Markdown("### Download from the Hugging Face Hub")
            with gr.Row():
                download_name = gr.Textbox(
                    label="Model", placeholder="org/repo or org/repo:branch", elem_id="download-name", scale=3
                )
                download_token = gr.Textbox(
                    label="Token (gated or private repos)", type="password", elem_id="download-token", scale=2
                )
                gguf_file = gr.Textbox(label="GGUF file (repos with several)", elem_id="download-gguf", scale=2)
            with gr.Row():
                branches_button = gr.Button("List branches", elem_id="list-branches")
                download_button = gr.Button("Download", variant="primary", elem_id="start-download")
                cancel_download = gr.Button("Cancel download", variant="stop", elem_id="cancel-download")
            branch_table = gr.Dataframe(
                headers=BRANCH_COLUMNS, interactive=False, elem_id="branch-table", wrap=True
            )
            download_status = gr.Markdown(elem_id="download-status")
            download_job = gr.State(None)
            download_timer = gr.Timer(0.5, active=False)

        # -- chat wiring ------------------------------------------------------------------------
        # Inputs given as a set arrive as one {component: value} dict; the parameter values are
        # read back in parameter_specs() order.
        def values(data) -> tuple:
            return tuple(data[control] for control in param_inputs)

        def send(data, request: gr.Request):
            yield from chat.send(data[message], data[history], _owner(request), *values(data))

        def regenerate(data, request: gr.Request):
            yield from chat.regenerate(data[history], _owner(request), *values(data))

        def stop(request: gr.Request):
            return chat.stop(_owner(request))

        def clear(request: gr.Request):
            return chat.clear(_owner(request))

        def leave(request: gr.Request):
            engine.stop(_owner(request))

        send_outputs = [message, chatbot, history, chat_status]
        for trigger in (send_button.click, message.submit):
            trigger(send, {message, history, *param_inputs}, send_outputs, concurrency_limit=UNLIMITED)
        regenerate_button.click(
            regenerate, {history, *param_inputs}, [chatbot, history, chat_status], concurrency_limit=UNLIMITED
        )
        stop_button.click(stop, None, chat_status, concurrency_limit=UNLIMITED)
        clear_button.click(clear, None, [chatbot, history, chat_status], concurrency_limit=UNLIMITED)
        demo.unload(leave)

        # -- model wiring -----------------------------------------------------------------------
        def refresh():
            names = models.model_names()
            current = models.initial_model()
            return gr.update(choices=names, value=current), models.loaded_status()

        def describe(name, loader):
            folder, table, choices = models.describe(name, loader)
            value = loader if loader in {value for _, value in choices} else AUTO_LOADER
            return folder, table, gr.update(choices=choices, value=value)

        def pick_model(name):
            return describe(name, models.saved_loader(name))  # restore this model's own choice

        describe_io = ([model_choice, loader_choice], [details, candidates, loader_choice])
        refresh_button.click(refresh, None, [model_choice, loaded]).then(describe, *describe_io)
        model_choice.change(pick_model, [model_choice], describe_io[1])
        loader_choice.input(describe, *describe_io)  # .input: user choices only, no update loop
        load_button.click(models.load, [model_choice, loader_choice, allow_pt], loaded)
        reload_button.click(models.reload, None, loaded)
        unload_button.click(models.unload, None, loaded)
        demo.load(describe, *describe_io).then(models.loaded_status, None, loaded)

        # -- download wiring --------------------------------------------------------------------
        def list_branches_(name, token):
            rows, status = downloads.branches(name, token)
            return rows, status

        def pick_branch(name, event: gr.SelectData):
            row = event.row_value or []
            return downloads.name_for_branch(name, row[0]) if row else name

        def start_download(name, token, gguf):
            job_id, status = downloads.start(name, token, gguf)
            return job_id, status, gr.Timer(active=job_id is not None)

        def poll_download(job_id):
            status, finished = downloads.poll(job_id)
            choices = gr.update(choices=models.model_names()) if finished else gr.update()
            return status, gr.Timer(active=not finished), choices

        branches_button.click(list_branches_, [download_name, download_token], [branch_table, download_status])
        branch_table.select(pick_branch, [download_name], download_name)
        download_button.click(start_download, [download_name, download_token, gguf_file],
                              [download_job, download_status, download_timer])
        download_timer.tick(poll_download, download_job, [download_status, download_timer, model_choice])
        cancel_download.click(downloads.cancel, download_job, download_status)
    return demo
