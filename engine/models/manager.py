"""The model manager: lists local models, loads one with the chosen loader, swaps and unloads.

A load builds the new model first and only then swaps it in, so a failed load leaves the
previously loaded model in place. Generation holds the model through ``use()``; a swap waits
for the running generation to finish.
"""

from __future__ import annotations

import gc
import logging
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from pydantic import ValidationError

from loadstar.engine.errors import LoadCancelled, LoadstarError, ModelLoadError
from loadstar.engine.models.load_failures import load_failure
from loadstar.engine.models.loader_api import LoadedModel, LoadedModelInfo, Loader
from loadstar.engine.models.choice import LoaderCandidate, choose_loader, rank_loaders
from loadstar.engine.models.folder import (
    ModelFolder, folder_signature, inspect_model_folder, list_model_folders, resolve_model_folder,
)
from loadstar.engine.models.model_thread import ModelThread
from loadstar.engine.errors import problem_line

log = logging.getLogger(__name__)


class ModelManager:
    def __init__(
        self, models_dir: Path, loaders: Callable[[], Mapping[str, Loader]], *, load_defaults: dict[str, Any] | None = None,
        model_thread: ModelThread | None = None,
    ) -> None:
        """``loaders`` gives the registered loaders by name (the plugin host's ``loaders``, so the
        models part never imports the plugins part). ``load_defaults`` fill loader options of the same name the user did not set
        (``device``, ``scratch_dir``, ``allow_pt``, ``max_batch``), whichever a loader's Options declare."""
        self.models_dir = models_dir
        self._loaders = loaders
        self._load_defaults = dict(load_defaults or {})
        self.model_thread = model_thread or ModelThread()
        self._current: LoadedModel | None = None
        self._current_folder: ModelFolder | None = None
        self._use_lock = threading.RLock()  # held while a generation runs, and for a swap
        self._load_lock = threading.Lock()  # one load at a time
        # Inspections by folder name, each with the folder's signature (names, sizes, mtimes):
        # listing and describing models never reads weights again while nothing changed on disk.
        self._inspected: dict[str, tuple[tuple[Any, ...], ModelFolder]] = {}
        self._inspected_lock = threading.Lock()

    # -- what is on disk -----------------------------------------------------------------------

    def list_models(self) -> list[str]:
        return list_model_folders(self.models_dir)

    def inspect(self, name: str) -> ModelFolder:
        """The folder's facts; read once, then again only when a file in it changes."""
        path = resolve_model_folder(self.models_dir, name)
        signature = folder_signature(path)
        with self._inspected_lock:
            cached = self._inspected.get(name)
        if cached is not None and cached[0] == signature:
            return cached[1]
        folder = inspect_model_folder(path)
        with self._inspected_lock:
            self._inspected[name] = (signature, folder)
            for gone in set(self._inspected) - set(self.list_models()):
                del self._inspected[gone]
        return folder

    def candidates(self, name: str, pinned: str | None = None) -> list[LoaderCandidate]:
        """Every loader's verdict on model ``name``, best first (for the UI)."""
        return self.rank(self.inspect(name), pinned)

    def rank(self, folder: ModelFolder, pinned: str | None = None) -> list[LoaderCandidate]:
        """Every loader's verdict on an inspected folder, best first."""
        return rank_loaders(folder, self._loaders(), pinned)

    def loader_names(self) -> list[str]:
        return sorted(self._loaders(), key=str.lower)

    # -- what is loaded ------------------------------------------------------------------------

    @property
    def loaded(self) -> LoadedModelInfo | None:
        current = self._current
        return current.info if current is not None else None

    @property
    def loaded_folder(self) -> ModelFolder | None:
        """The inspected folder of the loaded model (its path, chat template source, ...)."""
        return self._current_folder if self._current is not None else None

    @property
    def load_pending(self) -> bool:
        """Whether a load (or unload) is under way: the generation service lets its batch drain."""
        return self._load_lock.locked()

    @contextmanager
    def use(self) -> Iterator[LoadedModel | None]:
        with self._use_lock:
            yield self._current

    def load(
        self, name: str, loader: str | None = None, options: dict[str, Any] | None = None,
        cancel: threading.Event | None = None,
    ) -> LoadedModelInfo:
        """Load model ``name`` (the pinned ``loader`` or the best one) and make it current.

        Raises a ``LoadstarError`` with a one-line reason; the previous model stays loaded then.
        ``cancel``: no loader can stop half-way, so a load cancelled while it runs finishes, is
        unloaded at once and never replaces the current model (``LoadCancelled``).
        """
        with self._load_lock:
            if cancel is not None and cancel.is_set():
                raise LoadCancelled(f"loading {name} was cancelled")
            folder = self.inspect(name)
            loaders = self._loaders()
            chosen = choose_loader(folder, loaders, loader)
            plugin = loaders[chosen.loader]
            merged = dict(options or {})
            for key, value in self._load_defaults.items():
                if key in plugin.Options.model_fields:
                    merged.setdefault(key, value)
            try:
                validated = plugin.Options.model_validate(merged)
            except ValidationError as error:
                raise ModelLoadError(f"{chosen.loader} option {problem_line(error)}") from None
            log.info("loading %s with %s (%s)", name, chosen.loader, chosen.reason)
            try:
                model = self.model_thread.call(plugin.load, folder, validated)
            except LoadstarError:
                raise
            except Exception as error:
                log.exception("%s failed to load %s", chosen.loader, name)
                files = [w.path for w in folder.weight_files]
                raise ModelLoadError(f"{chosen.loader} could not load {name}: {load_failure(error, files, folder.path)}") from None
            if not isinstance(model, LoadedModel):
                raise ModelLoadError(
                    f"{chosen.loader} returned a {type(model).__name__}, not a loadstar.LoadedModel: "
                    "its plugin needs updating"
                )
            if cancel is not None and cancel.is_set():
                self._unload(model)
                del model
                _release_memory()
                raise LoadCancelled(f"loading {name} was cancelled")
            self._swap(model, folder)
            return model.info

    def unload(self) -> bool:
        """Unload the current model; False if none was loaded."""
        with self._load_lock:
            return self._swap(None)

    def _swap(self, model: LoadedModel | None, folder: ModelFolder | None = None) -> bool:
        with self._use_lock:
            old, self._current = self._current, model
            self._current_folder = folder
        if old is None:
            return False
        self._unload(old)
        del old
        _release_memory()
        return True

    def _unload(self, model: LoadedModel) -> None:
        try:
            self.model_thread.call(model.unload)
        except Exception:
            log.exception("unloading %s failed", model.info.name)


def _release_memory() -> None:
    gc.collect()
    release_freed_memory()


def release_freed_memory() -> None:
    """Hand memory freed by the unloaded model back to the OS (glibc keeps it in its arenas otherwise)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to do
