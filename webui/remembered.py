"""What a browser remembers between visits, in its localStorage: the open conversation, and the
preset and parameters in use. (The sidebar's state and dark mode are kept by the page's script.)"""

from __future__ import annotations

from typing import Any

import gradio as gr
from pydantic import ValidationError

from loadstar.engine.sampling import SamplingParams, parameter_specs

STORAGE_KEY = "loadstar-ui"
# Nothing secret is stored (a conversation id, sampling values), and Gradio's default key is new at
# every server start, which would forget everything on a restart: so a fixed one.
STORAGE_SECRET = "loadstar-ui-1"
# The page's own script: the sidebar as the browser left it (closed on a phone the first time),
# and dark mode as chosen.
PAGE_SCRIPT = """() => {
    const dark = localStorage.getItem('loadstar-dark');
    if (dark !== null) document.body.classList.toggle('dark', dark === '1');
    const saved = localStorage.getItem('loadstar-sidebar');
    const wanted = saved === null ? window.innerWidth > 768 : saved === '1';
    const apply = (tries) => {
        const sidebar = document.querySelector('#conversation-sidebar');
        const button = sidebar && sidebar.querySelector('.toggle-button');
        if (!button) { if (tries > 0) setTimeout(() => apply(tries - 1), 100); return; }
        if (sidebar.classList.contains('open') !== wanted) button.click();
    };
    apply(50);
}"""
# On a phone the open sidebar covers the chat: it closes once a conversation is picked.
CLOSE_SIDEBAR_ON_PHONE = """() => {
    const sidebar = document.querySelector('#conversation-sidebar');
    if (window.innerWidth <= 768 && sidebar && sidebar.classList.contains('open'))
        sidebar.querySelector('.toggle-button').click();
}"""
SIDEBAR_OPENED = "() => { localStorage.setItem('loadstar-sidebar', '1'); }"
SIDEBAR_CLOSED = "() => { localStorage.setItem('loadstar-sidebar', '0'); }"


def browser_memory() -> gr.BrowserState:
    return gr.BrowserState({}, storage_key=STORAGE_KEY, secret=STORAGE_SECRET)


def remembered(memory: Any, key: str) -> Any:
    return memory.get(key) if isinstance(memory, dict) else None


def remember(memory: Any, **changes: Any) -> dict[str, Any]:
    return {**(memory if isinstance(memory, dict) else {}), **changes}


def parameters_to_remember(values: tuple[Any, ...], stops: str) -> dict[str, Any]:
    return {"values": {spec.name: value for spec, value in zip(parameter_specs(), values, strict=False)}, "stops": stops or ""}


def parameters_to_restore(saved: Any) -> tuple[list[Any], Any] | None:
    """(control values in spec order, stop strings) from what the browser kept; a value that is no
    longer valid (limits changed, storage edited) is left as the page has it."""
    if not isinstance(saved, dict) or not isinstance(saved.get("values"), dict):
        return None
    values = []
    for spec in parameter_specs():
        value = saved["values"].get(spec.name)
        try:
            SamplingParams.model_validate({spec.name: value})
        except ValidationError:
            value = gr.update()
        values.append(gr.update() if value is None else value)
    stops = saved.get("stops")
    return values, stops if isinstance(stops, str) else gr.update()
