"""The Parameters panel (beside the chat): sampling controls drawn from ``parameter_specs()``, presets, stop strings, prompt format."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from loadstar.engine.chat.prompt_formats import AUTO, NAMED_FORMATS
from loadstar.engine.errors import LoadstarError
from loadstar.engine.facade import Engine
from loadstar.engine.sampling import parameter_specs
from loadstar.webui.chat_handlers import who
from loadstar.webui.preset_handlers import MODEL_DEFAULTS, PresetHandlers

PRESET = "Preset"
CHANGED = "Preset · changed (values set by hand)"


@dataclass
class ParameterControls:
    controls: list[Any]  # in parameter_specs() order
    stops: gr.Textbox
    # Re-read on page load and after a model load: the model's defaults, ignored-parameter marks
    # and prompt format.
    refresh: Callable[[gr.Request], list[Any]] | None = None
    refresh_outputs: list[Any] = field(default_factory=list)
    preset: Any = None  # the preset dropdown
    preset_loaded: Any = None  # the event of loading a preset, to chain on

    @property
    def inputs(self) -> list[Any]:
        return [*self.controls, self.stops]

    def read(self, data: dict[Any, Any]) -> tuple[tuple[Any, ...], str]:
        """(control values, stop strings text) from a set-inputs dict."""
        return tuple(data[c] for c in self.controls), data[self.stops]


def _control(spec: Any) -> Any:
    common = {"label": spec.label, "info": spec.description, "elem_id": f"param-{spec.name}"}
    if spec.kind is bool:
        return gr.Checkbox(value=spec.default, **common)
    if spec.name in ("seed", "truncation_length"):
        return gr.Number(value=spec.default, precision=0, minimum=spec.minimum, maximum=spec.maximum, **common)
    return gr.Slider(minimum=spec.minimum, maximum=spec.maximum, step=spec.step, value=spec.default, **common)


def build_parameters_tab(engine: Engine) -> ParameterControls:
    presets = PresetHandlers(engine)
    preset = gr.Dropdown(presets.names(None), value=MODEL_DEFAULTS, label=PRESET, elem_id="preset-choice")
    with gr.Row():
        load = gr.Button("Load preset", elem_id="preset-load", size="sm", min_width=80)
        delete = gr.Button("Delete preset", elem_id="preset-delete", size="sm", min_width=80)
    name = gr.Textbox(label="Save the values below as", placeholder="preset name", elem_id="preset-name")
    save = gr.Button("Save preset", elem_id="preset-save", size="sm")
    preset_status = gr.Markdown(elem_id="preset-status")
    with gr.Column():
        fmt = gr.Dropdown([AUTO, *NAMED_FORMATS], value=AUTO, label="Prompt format (loaded model)",
                          info="auto: the model's own chat template, else the card's named format, else completion",
                          elem_id="prompt-format", scale=2)
        fmt_status = gr.Markdown(elem_id="prompt-format-status")
    controls: list[Any] = []
    specs = parameter_specs()
    controls.extend(_control(spec) for spec in specs)  # one under another: the panel is narrow
    stops = gr.Textbox(label="Custom stop strings", lines=2, elem_id="param-stop",
                       info=r"One per line; \n means a line break. The reply ends before the first one.")
    parameters = ParameterControls(controls, stops)

    def load_preset(chosen, request: gr.Request):
        values, status = presets.load(who(request).user, chosen)
        return [*(gr.update() if v is None else v for v in values), status, gr.update(label=PRESET)]

    def save_preset(data, request: gr.Request):
        values, _ = parameters.read(data)
        user = who(request).user
        status = presets.save(user, data[name], values)
        chosen = data[name] if status.startswith("Saved") else data[preset]
        return status, gr.update(choices=presets.names(user), value=chosen)

    def delete_preset(chosen, request: gr.Request):
        user = who(request).user
        status = presets.delete(user, chosen)
        return status, gr.update(choices=presets.names(user), value=MODEL_DEFAULTS if status.startswith("Deleted") else chosen)

    def describe_format():
        chosen = engine.loaded_prompt_format()
        if chosen is None:
            return gr.update(), "No model is loaded."
        saved = engine.saved_choice(engine.loaded.name) if engine.loaded else None
        pinned = saved.prompt_format if saved and saved.prompt_format else AUTO
        return gr.update(value=pinned), f"Using **{chosen.format.name}**: {chosen.why}."

    def pick_format(value):
        try:
            engine.set_prompt_format(value)
        except LoadstarError as error:
            return gr.update(), f"⚠️ {error}"
        return describe_format()

    def page_opened(request: gr.Request):
        user = who(request).user
        values, _ = presets.load(user, MODEL_DEFAULTS)  # the loaded model's generation_config defaults
        labels = presets.labels()
        return [*(gr.update(value=v, label=label) for v, label in zip(values, labels, strict=False)), *describe_format(),
                gr.update(choices=presets.names(user))]

    parameters.preset = preset
    parameters.preset_loaded = load.click(load_preset, preset, [*controls, preset_status, preset])
    for control in parameters.inputs:  # a value set by hand: the preset box says the values are its own no more
        control.input(lambda: gr.update(label=CHANGED), None, preset, queue=False, show_progress="hidden")
    save.click(save_preset, {name, preset, *parameters.inputs}, [preset_status, preset])
    delete.click(delete_preset, preset, [preset_status, preset])
    fmt.input(pick_format, fmt, [fmt, fmt_status])
    parameters.refresh = page_opened
    parameters.refresh_outputs = [*controls, fmt, fmt_status, preset]
    return parameters
