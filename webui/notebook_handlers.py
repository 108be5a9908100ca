"""Notebook tab handlers: raw completion of free text (no chat format), streamed into the text."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pydantic import ValidationError

from loadstar.engine.errors import LoadstarError, problem_line
from loadstar.engine.facade import Engine
from loadstar.engine.generation.requests import Finished, GenerationRequest, Queued, Started
from loadstar.webui.chat_handlers import (
    finished_status,
    sampling_from_values,
    stop_status,
    stops_from_text,
)
from loadstar.webui.streaming import redraws, update_interval


class NotebookHandlers:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def generate(
        self, text: str, owner: str, params: tuple[Any, ...], stops: str
    ) -> Iterator[tuple[str, str, str]]:
        """Continue ``text`` with the model; yields (text, status, previous text for Undo)."""
        original = text or ""
        if not original.strip():
            yield original, "Write something for the model to continue.", original
            return
        if self.engine.has_work(owner):
            yield original, "Still generating: press Stop first.", original
            return
        try:
            handle = self.engine.submit(GenerationRequest(
                prompt=original, params=sampling_from_values(params), owner=owner, stop=stops_from_text(stops)
            ))
        except (LoadstarError, ValidationError) as error:
            yield original, f"⚠️ {problem_line(error)}", original
            return
        status = "Queued…"
        try:
            for redraw in redraws(handle, update_interval(self.engine.loaded)):
                event = redraw.event
                if isinstance(event, Queued):
                    status = f"Waiting in the queue: position {event.position}."
                elif isinstance(event, Started):
                    status = f"Generating ({event.prompt_tokens} prompt tokens)…"
                elif isinstance(event, Finished):
                    status = finished_status(event)
                yield original + redraw.text, status, original
        finally:
            handle.cancel()

    def stop(self, owner: str) -> str | None:
        return stop_status(self.engine, owner)

    def count(self, text: str) -> str:
        if not text:
            return "0 tokens."
        try:
            prepared = self.engine.preview(GenerationRequest(prompt=text))
        except LoadstarError as error:
            return f"⚠️ {error}"
        return f"{prepared.prompt_tokens} tokens."
