"""The one loop over a generation's events for the web UI: which events are worth a redraw.

Every update re-renders the whole chat (or notebook) in the browser, so streamed text goes out at
most once per ``UPDATE_INTERVAL`` (~12 a second keeps the page smooth and leaves the CPU to the
model, measured in bench/); the first text goes at once (time to first token is what users feel),
and the queue position, the start and the finish always do. The API streams every delta itself
(Server-Sent Events on its event loop, see api/openai_routes.py): a different consumer.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

from loadstar.engine.generation.requests import Finished, GenerationEvent, TextDelta
from loadstar.engine.generation.service import GenerationHandle

UPDATE_INTERVAL = 0.08  # seconds between streamed text updates


@dataclass(frozen=True)
class Redraw:
    event: GenerationEvent
    text: str  # the reply so far; once Finished, its final text (what had come, after an error)


def redraws(handle: GenerationHandle, interval: float = UPDATE_INTERVAL) -> Iterator[Redraw]:
    text, last, text_shown = "", 0.0, False
    for event in handle.events():
        if isinstance(event, TextDelta):
            text += event.text
            if text_shown and time.monotonic() - last < interval:
                continue
            text_shown = True
        elif isinstance(event, Finished) and event.reason != "error":
            text = event.text
        last = time.monotonic()
        yield Redraw(event, text)
