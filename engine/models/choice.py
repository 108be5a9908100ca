"""Loader choice: every loader gives its verdict on a folder; the core ranks them and explains.

The order never depends on registration order: usable loaders first by priority, then by name.
A loader the user pinned wins if it is available and says it can load the folder; otherwise the
choice fails with that loader's own reason rather than silently using another.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from loadstar.engine.errors import NoLoaderError, one_line
from loadstar.engine.models.folder import ModelFolder
from loadstar.engine.models.loader_api import Loader

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoaderCandidate:
    loader: str
    available: bool
    can_load: bool
    priority: int
    reason: str
    pinned: bool = False

    @property
    def usable(self) -> bool:
        return self.available and self.can_load

    @property
    def verdict(self) -> str:
        if not self.available:
            return "unavailable"
        return "can load" if self.can_load else "cannot load"

    def describe(self) -> str:
        """E.g. "ExLlamaV2: unavailable, no CUDA device" or "Transformers: can load (priority 50), GGUF file"."""
        head = f"{self.loader}: {self.verdict}"
        if self.usable:
            head += f" (priority {self.priority})"
        return f"{head}, {self.reason}" + (" [pinned]" if self.pinned else "")


def rank_loaders(
    folder: ModelFolder, loaders: Mapping[str, Loader], pinned: str | None = None
) -> list[LoaderCandidate]:
    """Every loader's verdict on ``folder``, best first. A loader that raises is listed with its error."""
    candidates = [_candidate(loader, folder, pinned) for loader in loaders.values()]

    def order(candidate: LoaderCandidate) -> tuple:
        usable_pinned = candidate.pinned and candidate.usable
        return (not usable_pinned, not candidate.usable, -candidate.priority, candidate.loader.lower())

    return sorted(candidates, key=order)


def choose_loader(
    folder: ModelFolder, loaders: Mapping[str, Loader], pinned: str | None = None
) -> LoaderCandidate:
    """The loader to use for ``folder``, or ``NoLoaderError`` saying why there is none."""
    if pinned is not None and pinned not in loaders:
        known = ", ".join(sorted(loaders)) or "none"
        raise NoLoaderError(f"unknown loader '{pinned}' (known loaders: {known})")
    ranked = rank_loaders(folder, loaders, pinned)
    if pinned is not None:
        chosen = next(c for c in ranked if c.loader == pinned)
        if not chosen.usable:
            raise NoLoaderError(f"{folder.name}: {chosen.describe()}")
        return chosen
    if ranked and ranked[0].usable:
        return ranked[0]
    if not folder.weight_files:
        raise NoLoaderError(
            f"{folder.name} holds no weight files (.safetensors, .bin, .pt or .gguf) in {folder.path}"
        )
    reasons = "; ".join(c.describe() for c in ranked) or "no loaders are registered"
    raise NoLoaderError(f"no loader can load {folder.name}: {reasons}")


def _candidate(loader: Loader, folder: ModelFolder, pinned: str | None) -> LoaderCandidate:
    is_pinned = loader.name == pinned
    try:
        availability = loader.availability()
    except Exception as error:  # a broken plugin must not break the list
        log.exception("loader %s failed in availability()", loader.name)
        return LoaderCandidate(loader.name, False, False, 0, f"error: {one_line(error)}", is_pinned)
    if not availability.available:
        return LoaderCandidate(loader.name, False, False, 0, availability.reason, is_pinned)
    try:
        assessment = loader.assess(folder)
    except Exception as error:
        log.exception("loader %s failed in assess()", loader.name)
        return LoaderCandidate(loader.name, True, False, 0, f"error: {one_line(error)}", is_pinned)
    return LoaderCandidate(
        loader.name, True, assessment.can_load, assessment.priority, assessment.reason, is_pinned
    )
