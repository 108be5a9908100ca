"""Loaders that fault natively on purpose (``ctypes.string_at(0)``: a read of address 0, SIGSEGV).

They live in a module of their own so a model worker can import them as the server does.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator

from pydantic import BaseModel, ConfigDict

from loadstar import (
    Assessment,
    Availability,
    CancelToken,
    LoadedModel,
    LoadedModelInfo,
    ModelFolder,
    SamplingParams,
    StreamPiece,
)


class CrashOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SegfaultingModel(LoadedModel):
    """Answers a few words, then, when the prompt asks for it ("crash"), reads address 0."""

    def __init__(self, name: str) -> None:
        self.info = LoadedModelInfo(name=name, loader="Segfault", device="cpu", dtype="none", context_length=100)

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def stream(self, prompt: str, params: SamplingParams, cancel: CancelToken, *, seed: int) -> Iterator[StreamPiece]:
        yield StreamPiece("first ", 1)
        if "crash" in prompt:
            ctypes.string_at(0)
        yield StreamPiece("second", 1)


class SegfaultingLoader:
    """Loads ``SegfaultingModel``; with ``at_load`` the load itself faults."""

    Options = CrashOptions

    def __init__(self, name: str = "Segfault", *, at_load: bool = False) -> None:
        self.name = name
        self.at_load = at_load

    def availability(self) -> Availability:
        return Availability(True, "always")

    def assess(self, folder: ModelFolder) -> Assessment:
        return Assessment(True, "faults on purpose", 90)

    def load(self, folder: ModelFolder, options: BaseModel) -> SegfaultingModel:
        if self.at_load:
            ctypes.string_at(0)
        return SegfaultingModel(folder.name)
