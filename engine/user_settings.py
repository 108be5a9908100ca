"""What the app remembers between runs: the last model, each model's loader and prompt format, extensions."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from loadstar.engine.atomic import read_store, write_atomic

log = logging.getLogger(__name__)


class ModelChoice(BaseModel):
    """How a model folder was loaded last time: the pinned loader (None = automatic) and its options."""

    model_config = ConfigDict(extra="ignore")

    loader: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    prompt_format: str | None = None  # a named format the user picked; None = automatic
    load_seconds: float | None = Field(None, ge=0, allow_inf_nan=False)  # the last load's time, for progress


class UserSettings(BaseModel):
    model_config = ConfigDict(extra="ignore")

    last_model: str | None = None
    last_loader: str | None = None
    # Keyed by the exact folder name: no patterns, so one model's settings never leak to another.
    models: dict[str, ModelChoice] = Field(default_factory=dict)
    extensions: dict[str, bool] = Field(default_factory=dict)  # optional plugins turned on or off


class UserSettingsStore:
    """Reads and atomically writes ``settings.json`` in the data folder."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> UserSettings:
        return read_store(self.path, UserSettings)

    def write(self, settings: UserSettings) -> None:
        write_atomic(self.path, settings.model_dump_json(indent=2).encode("utf-8"))

    def update(self, **changes: object) -> UserSettings:
        updated = self.read().model_copy(update=changes)
        self.write(updated)
        return updated
