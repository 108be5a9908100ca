"""The web UI's streaming: which of a generation's events are worth a redraw, and what each
redraw sends.

Every update re-renders the chat (or notebook) in the browser: about 20 ms of CPU each on our
2-core machines, taken from the model when the browser runs beside it (it most often does: a
local app). So streamed text goes out at most once per interval: ``CPU_UPDATE_INTERVAL`` for a
model that decodes on the CPU, whose cores the browser shares, ``UPDATE_INTERVAL`` for one on a
GPU. The first text goes at once (time to first token is what users feel), and the finish always
does; a model slower than the interval shows every token as it comes. A queue position or the
start is shown only when the first text has not come within ``HOLD`` (a prompt read from the
cache takes tens of ms: a "Generating…" flashing meanwhile is a redraw for nothing, beside the
model). Measured (bench/NOTES.md, 128 tokens, browser on the same 2 cores, decode vs llama.cpp
alone): 0.12 s 0.76x, 0.2 s 0.83x; five redraws a second still read as a stream.

A redraw names only the outputs that changed (``only_changes``): the browser lays out each output
it is sent, and a box the user is typing in is left alone.

The API streams every delta itself (Server-Sent Events on its event loop, see
api/openai_routes.py): a different consumer.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import gradio as gr

from loadstar.engine.generation.requests import Finished, GenerationEvent, Queued, Started, TextDelta
from loadstar.engine.generation.service import GenerationHandle
from loadstar.engine.models.loader_api import LoadedModelInfo

UPDATE_INTERVAL = 0.12  # seconds between streamed text updates of a model on a GPU
CPU_UPDATE_INTERVAL = 0.2  # of a model on the CPU: each redraw takes from the model's own cores
# A queue position or "Generating…" is shown only when the reply's first text has not come
# within this: a prompt read from the cache takes a few tens of ms, and a redraw meanwhile costs
# the browser (beside the model, on the same cores) a layout of the whole chat.
HOLD = 0.3


@dataclass(frozen=True)
class Redraw:
    event: GenerationEvent
    text: str  # the reply so far; once Finished, its final text (what had come, after an error)


def update_interval(model: LoadedModelInfo | None) -> float:
    """Seconds between redraws of a reply from ``model`` (None: not known yet, as on the CPU)."""
    return CPU_UPDATE_INTERVAL if model is None or model.device.startswith("cpu") else UPDATE_INTERVAL


def redraws(handle: GenerationHandle, interval: float = UPDATE_INTERVAL, hold: float = HOLD) -> Iterator[Redraw]:
    text, last, text_shown = "", 0.0, False
    held: list[GenerationEvent] = []  # a queue position or the start, while the prompt is read
    held_since = 0.0
    while True:
        wait = max(0.0, held_since + hold - time.monotonic()) if held else None
        event = handle.next_event(wait)
        if event is None:  # nothing came while they were held: show them
            for kept in held:
                yield Redraw(kept, text)
            held, last = [], time.monotonic()
            continue
        if isinstance(event, Queued | Started) and not text_shown:
            if not held:
                held_since = time.monotonic()
            held = [e for e in held if not isinstance(e, Queued)]  # a position passed is not shown
            held.append(event)
            continue
        for kept in held:  # the reply's first text (or its end) came: they go first, in order
            yield Redraw(kept, text)
        held = []
        if isinstance(event, TextDelta):
            text += event.text
            if text_shown and time.monotonic() - last < interval:
                continue
            text_shown = True
        elif isinstance(event, Finished) and event.reason != "error":
            text = event.text
        last = time.monotonic()
        yield Redraw(event, text)
        if isinstance(event, Finished):
            return


def only_changes(handler: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[list[Any]]]:
    """Wrap a streaming Gradio handler that yields every output each time: an output whose value is
    the one it sent last time becomes ``gr.skip()``. Text is compared by value, anything else (a
    chat's history, a state) by identity, so no large value is walked twice."""

    @functools.wraps(handler)
    def wrapper(*args: Any, **kwargs: Any) -> Iterator[list[Any]]:
        sent: list[Any] | None = None
        for row in handler(*args, **kwargs):
            values = list(row)
            yield values if sent is None else [gr.skip() if _same(v, s) else v for v, s in zip(values, sent, strict=True)]
            sent = values

    return wrapper


def _same(value: Any, before: Any) -> bool:
    if isinstance(value, str) and isinstance(before, str):
        return value == before
    if isinstance(value, dict) and isinstance(before, dict) and "__type__" in value:
        return value == before  # gr.update(...)
    return value is before
