"""The Extensions tab: every plugin with its hooks, on/off switches, problems; extensions' own UI.

Each discovered extension's ``webui_contribution`` is built once with the page (Gradio pages are
built once) and shown only while the extension is enabled; switching one on or off shows or
hides its tab or panel at once.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from loadstar.engine.errors import one_line
from loadstar.engine.facade import Engine


def plugin_rows(engine: Engine) -> list[list[str]]:
    rows = []
    for p in engine.plugin_list():
        source = "extensions/" + p.name if p.kind == "extension" else f"{p.distribution} {p.version}".strip()
        state = "on" if engine.plugin_enabled(p.name) else "off"
        rows.append([p.name, state, source, ", ".join(p.hooks), p.description])
    return rows


def problems_text(engine: Engine) -> str:
    problems = engine.plugin_problems()
    return "\n".join(f"- ⚠️ {p.describe()}" for p in problems) if problems else "No problems."


def optional_names(engine: Engine) -> list[str]:
    return [p.name for p in engine.plugin_list() if p.optional]


def build_extensions_tab(engine: Engine) -> tuple[Any, Any, Any]:
    """Components of the tab: (switches, table, problems); wired by ``wire_extensions``."""
    gr.Markdown("Extensions change requests, prompts and replies, add loaders and add to this page. "
                "An extension that fails is turned off for this session and listed below.")
    switches = gr.CheckboxGroup(optional_names(engine), value=[n for n in optional_names(engine)
                                if engine.plugin_enabled(n)], label="Enabled extensions", elem_id="extension-switches")
    table = gr.Dataframe(headers=["Plugin", "State", "From", "Hooks", "About"], value=plugin_rows(engine),
                         interactive=False, wrap=True, elem_id="plugin-table")
    problems = gr.Markdown(problems_text(engine), elem_id="plugin-problems")
    return switches, table, problems


def build_contributions(engine: Engine, placement: str, components: dict[str, Any]) -> list[tuple[str, Any]]:
    """Build the contributions of one placement; returns (extension name, container) pairs."""
    built = []
    context = engine.plugin_context(components)
    for name, contribution in engine.ui_contributions():
        if contribution.placement != placement:
            continue
        visible = engine.plugin_enabled(name)
        container = (gr.Tab(contribution.title, visible=visible, elem_id=f"ext-tab-{name}") if placement == "tab"
                     else gr.Accordion(contribution.title, visible=visible, elem_id=f"ext-panel-{name}"))
        with container:
            try:
                contribution.build(context)
            except Exception as error:  # a broken UI contribution must not take the page down
                gr.Markdown(f"⚠️ extension '{name}' could not build its UI: {one_line(error)}")
        built.append((name, container))
    return built


def wire_extensions(engine: Engine, demo: gr.Blocks, tab: tuple[Any, Any, Any],
                    containers: list[tuple[str, Any]]) -> None:
    switches, table, problems = tab

    def apply(chosen):
        chosen = set(chosen or [])
        for name in optional_names(engine):
            if engine.plugin_enabled(name) != (name in chosen):
                engine.set_extension_enabled(name, name in chosen)
        return refresh()

    def refresh():
        on = [n for n in optional_names(engine) if engine.plugin_enabled(n)]
        return [gr.update(value=on), plugin_rows(engine), problems_text(engine),
                *(gr.update(visible=engine.plugin_enabled(name)) for name, _ in containers)]

    outputs = [switches, table, problems, *(container for _, container in containers)]
    switches.input(apply, switches, outputs)
    demo.load(refresh, None, outputs)
