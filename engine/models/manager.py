"""The model manager: lists local models, loads one with the chosen loader, swaps and unloads.

A load builds the new model first and only then swaps it in, so a failed load leaves the
previously loaded model in place. Generation holds the model through ``use()``; a swap waits
for the running generation to finish.

With ``workers`` (the server's default) each model is loaded in a worker process of its own
(engine/models/worker.py), so a native fault costs the worker, not the server. When a worker
dies, what it was doing ends with one line, generation waits (``use()``) while the model is
loaded again once, and a second crash within ``CRASH_WINDOW_S`` leaves it unloaded, with the
reason in ``problem`` (the UI's model line, ``/health``). Unloading ends the worker, so all its
memory comes back. A cancelled load ends its worker at once.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from loadstar.engine.errors import LoadCancelled, LoadstarError, ModelLoadError, problem_line
from loadstar.engine.models.choice import LoaderCandidate, choose_loader, rank_loaders
from loadstar.engine.models.folder import (
    ModelFolder,
    folder_signature,
    format_size,
    inspect_model_folder,
    list_model_folders,
    resolve_model_folder,
)
from loadstar.engine.models.load_failures import load_error
from loadstar.engine.models.loader_api import LoadedModel, LoadedModelInfo, Loader
from loadstar.engine.models.model_thread import ModelThread
from loadstar.engine.models.worker import WorkerModel, start_worker

log = logging.getLogger(__name__)

CRASH_WINDOW_S = 60.0  # a model whose worker crashes again within this long is not loaded again
RECOVERY_WAIT_S = 900.0  # how long generation waits for a crashed model's reload


class ModelManager:
    def __init__(
        self, models_dir: Path, loaders: Callable[[], Mapping[str, Loader]], *, load_defaults: dict[str, Any] | None = None,
        model_thread: ModelThread | None = None, workers: bool = False, log_level: str = "INFO", max_models: int = 1,
    ) -> None:
        """``loaders`` gives the registered loaders by name (the plugin host's ``loaders``, so the
        models part never imports the plugins part). ``load_defaults`` fill loader options of the same name the user did not set
        (``device``, ``scratch_dir``, ``allow_pt``, ``max_batch``), whichever a loader's Options declare."""
        self.models_dir = models_dir
        self._loaders = loaders
        self._load_defaults = dict(load_defaults or {})
        self.model_thread = model_thread or ModelThread()
        self.max_models = max_models
        self._resident: dict[str, _Resident] = {}  # name -> the loaded model (up to max_models)
        self._current: str | None = None  # the resident model requests naming none go to
        self._use_lock = threading.RLock()  # held while a generation runs, and for a swap
        self._load_lock = threading.Lock()  # one load at a time
        # Inspections by folder name, each with the folder's signature (names, sizes, mtimes):
        # listing and describing models never reads weights again while nothing changed on disk.
        self._inspected: dict[str, tuple[tuple[Any, ...], ModelFolder]] = {}
        self._inspected_lock = threading.Lock()
        self._workers = workers
        self._log_level = log_level
        self._crashed_at: dict[str, float] = {}  # model name -> when its worker last crashed
        self._steady = threading.Event()  # clear while a crashed model is being loaded again
        self._steady.set()
        self.problem: str | None = None  # why no model is loaded after a crash (one line), for the UI and /health

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
        """The current model: the one that answers requests naming no model (the UI's)."""
        current = self._resident.get(self._current) if self._current else None
        return current.model.info if current is not None else None

    @property
    def loaded_folder(self) -> ModelFolder | None:
        """The inspected folder of the current model (its path, chat template source, ...)."""
        return self.folder_of(self._current) if self._current else None

    def folder_of(self, name: str) -> ModelFolder | None:
        """The inspected folder of resident model ``name``, or None when it is not resident."""
        resident = self._resident.get(name)
        return resident.folder if resident is not None else None

    def resident(self) -> list[LoadedModelInfo]:
        """Every loaded model, the current one first, then the most recently used."""
        entries = sorted(self._resident.values(), key=lambda r: (r.name != self._current, -r.last_used))
        return [r.model.info for r in entries]

    def is_resident(self, name: str) -> bool:
        return name in self._resident

    def resolve(self, name: str | None) -> str | None:
        """The resident model a request for ``name`` goes to (None: the current one); None when there is none."""
        if name is None:
            return self._current
        return name if name in self._resident else None

    @property
    def load_pending(self) -> bool:
        """Whether a load (or unload) is under way: the generation service lets its batch drain."""
        return self._load_lock.locked()

    @contextmanager
    def use(self, name: str | None = None) -> Iterator[LoadedModel | None]:
        """Hold resident model ``name`` (None: the current one) while a generation runs; None when it is not loaded."""
        self._steady.wait(RECOVERY_WAIT_S)  # a crashed worker's model is being loaded again: wait for it
        with self._use_lock:
            resident = self._resident.get(name or self._current or "")
            if resident is None:
                yield None
                return
            resident.last_used = time.monotonic()
            try:
                yield resident.model
            finally:
                resident.last_used = time.monotonic()

    def load(
        self, name: str, loader: str | None = None, options: dict[str, Any] | None = None,
        cancel: threading.Event | None = None, *, make_current: bool = True,
    ) -> LoadedModelInfo:
        """Load model ``name`` (the pinned ``loader`` or the best one) and make it current.

        Raises a ``LoadstarError`` with a one-line reason; the previous model stays loaded then.
        A resident ``name`` is replaced by the new load; with ``max_models`` resident already, the
        least recently used one is unloaded once the new one is in. ``cancel``: a worker's load ends
        at once (``LoadCancelled``); an in-process load cannot stop half-way, so it finishes, is
        unloaded at once and never replaces the current model.
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
            self._check_memory(name, plugin, folder, validated)
            log.info("loading %s with %s (%s)", name, chosen.loader, chosen.reason)
            try:
                if self._workers and getattr(plugin, "runs_in_worker", True):  # optional in the Loader protocol
                    model: LoadedModel = start_worker(plugin, folder, validated, on_exit=self._worker_exited,
                                                      log_level=self._log_level, cancel=cancel)
                else:
                    model = self.model_thread.call(plugin.load, folder, validated)
            except LoadstarError:
                if cancel is not None and cancel.is_set():
                    raise LoadCancelled(f"loading {name} was cancelled") from None
                raise
            except Exception as error:
                raise load_error(chosen.loader, name, error, [w.path for w in folder.weight_files], folder.path) from None
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
            self._put(_Resident(name, model, folder, chosen.loader, options), make_current)
            self.problem = None
            return model.info

    def ensure_resident(self, name: str, loader: str | None = None, options: dict[str, Any] | None = None) -> LoadedModelInfo:
        """Model ``name`` loaded, without making it current: as it is when resident, else loaded now."""
        resident = self._resident.get(name)
        if resident is not None:
            return resident.model.info
        return self.load(name, loader, options, make_current=False)

    def unload(self, name: str | None = None) -> bool:
        """Unload model ``name`` (None: the current one); False if it was not loaded."""
        with self._load_lock:
            target = name or self._current
            self.problem = None
            return self._take_out(target) if target else False

    def unload_idle(self, idle_seconds: float) -> list[str]:
        """Unload every model unused for ``idle_seconds`` (``--idle-unload``); the names unloaded."""
        now = time.monotonic()
        idle = [r.name for r in list(self._resident.values()) if now - r.last_used >= idle_seconds]
        gone = []
        for name in idle:
            with self._load_lock, self._use_lock:  # not while a generation holds it
                resident = self._resident.get(name)
                if resident is None or time.monotonic() - resident.last_used < idle_seconds:
                    continue
            if self.unload(name):
                log.info("unloaded %s: unused for %.0f minutes", name, idle_seconds / 60)
                gone.append(name)
        return gone

    def _check_memory(self, name: str, plugin: Loader, folder: ModelFolder, options: Any) -> None:
        """Refuse a load whose estimate does not fit in the memory free now plus what it would free, naming the numbers."""
        estimate_memory = getattr(plugin, "estimate_memory", None)  # optional in the Loader protocol
        if estimate_memory is None or str(getattr(options, "device", "cpu")) == "cuda":
            return
        try:
            estimate = estimate_memory(folder, options)
        except Exception:
            log.exception("%s failed to estimate %s", plugin.name, name)
            return
        if estimate is None:
            return
        import psutil

        needed = estimate.weights + (0 if estimate.grows else (estimate.kv_cache or 0))
        free = psutil.virtual_memory().available
        lru = self._least_recently_used() if len(self._resident) >= self.max_models else None
        leaving = [r for r in self._resident.values() if r.name == name] or ([lru] if lru is not None else [])
        freed = sum(_process_memory(r.model) for r in leaving)
        if needed > free + freed:
            parts = f"{format_size(estimate.weights)} of weights"
            if needed > estimate.weights:
                parts += f" + {format_size(needed - estimate.weights)} of KV cache"
            also = f" (+ {format_size(freed)} that unloading {leaving[0].name} would free)" if freed else ""
            raise ModelLoadError(
                f"{name} needs about {format_size(needed)} ({parts}), but {format_size(free)} of memory is free{also}: "
                "unload a model, or lower the context or batch in its loader options")

    def _least_recently_used(self) -> _Resident | None:
        return min(self._resident.values(), key=lambda r: r.last_used, default=None)

    def _put(self, new: _Resident, make_current: bool) -> None:
        """Make ``new`` resident (replacing the same name), unloading the least recently used past max_models."""
        with self._use_lock:
            old = self._resident.pop(new.name, None)
            evicted = []
            while len(self._resident) >= self.max_models:
                victim = self._least_recently_used()
                assert victim is not None
                evicted.append(self._resident.pop(victim.name))
            self._resident[new.name] = new
            if make_current or self._current not in self._resident:
                self._current = new.name
        for gone in [old, *evicted]:
            if gone is not None:
                if gone in evicted:
                    log.info("unloaded %s to make room for %s (--max-models %d)", gone.name, new.name, self.max_models)
                self._unload(gone.model)
        if old is not None or evicted:
            del old, evicted
            _release_memory()

    def _take_out(self, name: str, model: LoadedModel | None = None) -> bool:
        """Unload resident ``name`` (only if it still is ``model``, when given)."""
        with self._use_lock:
            resident = self._resident.get(name)
            if resident is None or (model is not None and resident.model is not model):
                return False
            del self._resident[name]
            if self._current == name:
                self._current = max(self._resident.values(), key=lambda r: r.last_used).name if self._resident else None
        self._unload(resident.model)
        del resident
        _release_memory()
        return True

    def _worker_exited(self, model: WorkerModel, reason: str) -> str:
        """A worker died (called on its reader thread, before its callers hear of it): what comes next, as
        the end of the line they get. Load it again once; after a second crash within a minute, leave it."""
        resident = next((r for r in self._resident.values() if r.model is model), None)
        if resident is None:
            return ""  # an old model, already replaced or unloaded
        name = resident.name
        now = time.monotonic()
        again = now - self._crashed_at.get(name, -CRASH_WINDOW_S) < CRASH_WINDOW_S
        self._crashed_at[name] = now
        self._steady.clear()
        threading.Thread(target=self._recover, args=(resident, reason, again), name="loadstar-recover", daemon=True).start()
        if again:
            return f"; it crashed twice within {CRASH_WINDOW_S:.0f} s, so {name} stays unloaded"
        return f"; reloading {name}"

    def _recover(self, crashed: _Resident, reason: str, again: bool) -> None:
        name = crashed.name
        try:
            if again:
                self.problem = (f"{reason} twice within {CRASH_WINDOW_S:.0f} s, so the model stays unloaded "
                                "(load it again when the cause is fixed)")
                log.error("%s", self.problem)
                with self._load_lock:
                    self._take_out(name, crashed.model)
                return
            log.warning("%s: loading %s again", reason, name)
            try:
                self.load(name, crashed.loader, crashed.options, make_current=self._current == name)
            except LoadstarError as error:
                self.problem = f"{reason}, and loading {name} again failed: {error}"
                log.error("%s", self.problem)
                with self._load_lock:
                    self._take_out(name, crashed.model)
        finally:
            self._steady.set()

    def _unload(self, model: LoadedModel) -> None:
        try:
            if isinstance(model, WorkerModel):
                model.unload()  # ends its process; needs no model thread (which may be waiting in use())
            else:
                self.model_thread.call(model.unload)
        except Exception:
            log.exception("unloading %s failed", model.info.name)


@dataclass(eq=False)
class _Resident:
    """A loaded model, what it was loaded from and with, and when it last answered."""

    name: str
    model: LoadedModel
    folder: ModelFolder
    loader: str
    options: dict[str, Any] | None
    last_used: float = field(default_factory=time.monotonic)


def _process_memory(model: LoadedModel) -> int:
    """What unloading ``model`` gives back: its worker's resident memory (an in-process model's is unknown: 0)."""
    if not isinstance(model, WorkerModel):
        return 0
    try:
        import psutil

        return int(psutil.Process(model.pid).memory_info().rss)
    except Exception:
        return 0


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
