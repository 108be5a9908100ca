"""The model manager: lists local models, loads one with the chosen loader, swaps and unloads.

A load builds the new model first and only then swaps it in, so a failed load leaves the
previously loaded model in place, unless memory is short: then the model it replaces goes first
(the memory check counts on what it frees, and both are never in memory at once; its running
requests get ``SWAP_WAIT_S`` to end, and a load cancelled meanwhile keeps it). One load runs
at a time, and a model asked for by two requests at once is loaded once.

Each loaded model is served by its engine core (core.py), in a worker process of its own with
``workers`` (the server's default, engine/models/worker.py: a native fault costs the worker, not
the server), else on a thread here. Generation holds a model through ``use()`` (a count, never a
lock: two models serve at once); a model that is replaced lets its running requests end, then
unloads; ``unload`` ends a model's requests at once. When a worker dies, what it was doing ends
with one line, generation waits (``use()``) while the model is loaded again once, and a second
crash within ``CRASH_WINDOW_S`` leaves it unloaded, with the reason in ``problem`` (the UI's model
line, ``/health``), where a worker that stopped responding is reported too. Unloading ends the
worker, so all its memory comes back. A cancelled load ends its worker at once.
"""

from __future__ import annotations

import functools
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
from loadstar.engine.models.core_client import CoreClient, load_in_thread
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
from loadstar.engine.models.worker import DEADLINE_S, start_worker

log = logging.getLogger(__name__)

CRASH_WINDOW_S = 60.0  # a model whose worker crashes again within this long is not loaded again
RECOVERY_WAIT_S = 900.0  # how long generation waits for a crashed model's reload
RETIRE_WAIT_S = 600.0  # how long a replaced model's running requests may go on before it is unloaded anyway
SWAP_WAIT_S = 30.0  # how long a load that needs a model's memory waits for that model's running requests
GPU_DEVICES = ("cuda", "gpu", "rocm", "hip")  # device strings (any index after ':') that put a model on a GPU


class ModelManager:
    def __init__(
        self, models_dir: Path, loaders: Callable[[], Mapping[str, Loader]], *, load_defaults: dict[str, Any] | None = None,
        workers: bool = False, log_level: str = "INFO", max_models: int = 1, deadline: float = DEADLINE_S,
    ) -> None:
        """``loaders`` gives the registered loaders by name (the plugin host's ``loaders``, so the
        models part never imports the plugins part). ``load_defaults`` fill loader options of the same name the user did not set
        (``device``, ``scratch_dir``, ``allow_pt``, ``max_batch``), whichever a loader's Options declare."""
        self.models_dir = models_dir
        self._loaders = loaders
        self._load_defaults = dict(load_defaults or {})
        self.max_models = max_models
        self._resident: dict[str, _Resident] = {}  # name -> the loaded model (up to max_models)
        self._current: str | None = None  # the resident model requests naming none go to
        self._lock = threading.Condition()  # guards the residents and their use counts (held briefly)
        self._load_lock = threading.RLock()  # one load (or unload) at a time
        self._deadline = deadline
        # Inspections by folder name, each with the folder's signature (names, sizes, mtimes):
        # listing and describing models never reads weights again while nothing changed on disk.
        self._inspected: dict[str, tuple[tuple[Any, ...], ModelFolder]] = {}
        self._inspected_lock = threading.Lock()
        self._workers = workers
        self._log_level = log_level
        self._crashed_at: dict[str, float] = {}  # model name -> when its worker last crashed
        self._recovering: dict[str, threading.Event] = {}  # name -> set once its reload after a crash is done
        self._problem: str | None = None  # why no model is loaded after a crash (one line)
        self._closed = False

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
    def problem(self) -> str | None:
        """One line for the UI's model line and ``/health``: a resident model's worker that is not
        responding, or why no model is loaded after a crash; None when all is well."""
        for resident in list(self._resident.values()):
            line = resident.model.problem if isinstance(resident.model, CoreClient) else None
            if line:
                return line
        return self._problem

    @problem.setter
    def problem(self, line: str | None) -> None:
        self._problem = line

    def serves(self, model: LoadedModel) -> bool:
        """Whether ``model`` is still resident (not replaced or unloaded) and not crashed: a lane then
        takes no more requests on it, and its next ``use()`` waits for the reload."""
        return any(r.model is model and r.name not in self._recovering for r in list(self._resident.values()))

    @contextmanager
    def use(self, name: str | None = None) -> Iterator[CoreClient | None]:
        """Hold resident model ``name`` (None: the current one) while it serves; None when it is not
        loaded. A count, not a lock: a model that is replaced waits for its holders before it unloads."""
        recovering = self._recovering.get(name or self._current or "")
        if recovering is not None:  # its worker crashed and it is being loaded again: wait for it (others go on)
            recovering.wait(RECOVERY_WAIT_S)
        with self._lock:
            resident = self._resident.get(name or self._current or "")
            if resident is None:
                client = None
            else:
                resident.users += 1
                resident.last_used = time.monotonic()
                client = resident.model
        if resident is None:
            yield None
            return
        try:
            yield client
        finally:
            with self._lock:
                resident.users -= 1
                resident.last_used = time.monotonic()
                self._lock.notify_all()

    @contextmanager
    def local(self, name: str | None = None) -> Iterator[Any]:
        """The model object itself, for a model served on a thread here (tests and benchmarks read
        its tokenizer, its network); None for a model in a worker or none loaded."""
        with self.use(name) as client:
            yield client.local if client is not None else None

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
            return self._load(name, loader, options, cancel, make_current=make_current)

    def _load(
        self, name: str, loader: str | None, options: dict[str, Any] | None, cancel: threading.Event | None, *,
        make_current: bool,
    ) -> LoadedModelInfo:
        if cancel is not None and cancel.is_set():
            raise LoadCancelled(f"loading {name} was cancelled")
        if self._closed:
            raise LoadCancelled(f"not loading {name}: the server is shutting down")
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
        gpu = functools.cache(gpu_free_memory)  # nvidia-smi once for the check and the count below
        leaving, on_gpu = self._check_memory(name, plugin, folder, validated, gpu)
        for resident in leaving:
            log.info("unloading %s first: %s needs the memory it holds", resident.name, name)
            self._make_room(resident, name, cancel)
        log.info("loading %s with %s (%s)", name, chosen.loader, chosen.reason)
        # what the GPU had free before this load (asked again once a model left: it gave memory back)
        gpu_before = (gpu_free_memory() if leaving else gpu()) if on_gpu else None
        try:
            if self._workers and getattr(plugin, "runs_in_worker", True):  # optional in the Loader protocol
                model: CoreClient = start_worker(plugin, folder, validated, on_exit=self._worker_exited,
                                                 log_level=self._log_level, cancel=cancel, deadline=self._deadline)
            else:
                model = load_in_thread(lambda: plugin.load(folder, validated), cancel=cancel)
        except LoadstarError:
            if cancel is not None and cancel.is_set():
                raise LoadCancelled(f"loading {name} was cancelled") from None
            raise
        except Exception as error:
            raise load_error(chosen.loader, name, error, [w.path for w in folder.weight_files], folder.path) from None
        if (cancel is not None and cancel.is_set()) or self._closed:  # (close() does not wait for a load)
            self._unload(model)
            del model
            _release_memory()
            raise LoadCancelled(f"loading {name} was cancelled" if not self._closed
                                else f"not keeping {name}: the server is shutting down")
        gpu_after = gpu_free_memory() if gpu_before is not None else None
        gpu_bytes = max(0, gpu_before - gpu_after) if gpu_before is not None and gpu_after is not None else 0
        self._put(_Resident(name, model, folder, chosen.loader, options, gpu_bytes=gpu_bytes), make_current)
        self.problem = None
        return model.info

    def ensure_resident(self, name: str, loader: str | None = None, options: dict[str, Any] | None = None) -> LoadedModelInfo:
        """Model ``name`` loaded, without making it current: as it is when resident, else loaded now."""
        resident = self._resident.get(name)
        if resident is not None:
            return resident.model.info
        with self._load_lock:  # a second request for the same model waits here, then finds it loaded
            resident = self._resident.get(name)
            if resident is not None:
                return resident.model.info
            return self._load(name, loader, options, None, make_current=False)

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
            with self._lock:  # not while a generation holds it
                resident = self._resident.get(name)
                if resident is None or resident.users or time.monotonic() - resident.last_used < idle_seconds:
                    continue
            if self.unload(name):
                log.info("unloaded %s: unused for %.0f minutes", name, idle_seconds / 60)
                gone.append(name)
        return gone

    def _check_memory(
        self, name: str, plugin: Loader, folder: ModelFolder, options: Any, gpu: Callable[[], int | None],
    ) -> tuple[list[_Resident], bool]:
        """Refuse a load whose estimate does not fit, naming the numbers. Returns the models that must
        be unloaded first (the one it replaces, or the least recently used past ``max_models``) when it
        fits only with the memory they free, and whether the load puts anything on a GPU. The share
        on a GPU (the estimate's ``gpu_share``, else all of it when the options' device is a GPU) is
        checked against the GPU's free memory (``gpu()``), the rest against free RAM."""
        estimate_memory = getattr(plugin, "estimate_memory", None)  # optional in the Loader protocol
        estimate = None
        if estimate_memory is not None:
            try:
                estimate = estimate_memory(folder, options)
            except Exception:
                log.exception("%s failed to estimate %s", plugin.name, name)
        share = estimate.gpu_share if estimate is not None and estimate.gpu_share is not None else (
            1.0 if _on_gpu(options, gpu) else 0.0)
        if estimate is None:
            return [], share > 0
        needed = estimate.weights + (0 if estimate.grows else (estimate.kv_cache or 0))
        lru = self._least_recently_used() if len(self._resident) >= self.max_models else None
        leaving = [r for r in self._resident.values() if r.name == name] or ([lru] if lru is not None else [])
        places = []
        if share > 0:
            gpu_free = gpu()
            if gpu_free is None:
                log.warning("cannot tell the GPU's free memory (no nvidia-smi): %s is loaded unchecked there", name)
            else:
                places.append((round(needed * share), gpu_free, "GPU memory", sum(r.gpu_bytes for r in leaving)))
        if share < 1:
            import psutil

            places.append((round(needed * (1 - share)), psutil.virtual_memory().available, "memory",
                           sum(_process_memory(r.model) for r in leaving)))
        must_leave = False
        for part, free, where, freed in places:
            if part <= free:
                continue
            if part > free + freed:
                parts = f"{format_size(estimate.weights)} of weights"
                if needed > estimate.weights:
                    parts += f" + {format_size(needed - estimate.weights)} of KV cache"
                whole = f"{format_size(needed)} ({parts})"
                if part < needed:  # a share of it here, the rest in the other place
                    what = "on the GPU" if where == "GPU memory" else "not on the GPU"
                    whole = f"{format_size(part)} of {where} (the {part / needed:.0%} of its {whole} {what})"
                also = f" (+ {format_size(freed)} that unloading {leaving[0].name} would free)" if freed else ""
                hint = ("put fewer layers on the GPU, " if where == "GPU memory" and estimate.gpu_share is not None
                        else "")
                raise ModelLoadError(
                    f"{name} needs about {whole}, but {format_size(free)} of {where} is free{also}: "
                    f"unload a model, {hint}or lower the context or batch in its loader options")
            must_leave = True
        return (leaving if must_leave else []), share > 0

    def _least_recently_used(self) -> _Resident | None:
        return min(self._resident.values(), key=lambda r: r.last_used, default=None)

    def _put(self, new: _Resident, make_current: bool) -> None:
        """Make ``new`` resident (replacing the same name), retiring the least recently used past max_models."""
        with self._lock:
            old = self._resident.pop(new.name, None)
            evicted = []
            while len(self._resident) >= self.max_models:
                victim = self._least_recently_used()
                assert victim is not None
                evicted.append(self._resident.pop(victim.name))
            self._resident[new.name] = new
            if make_current or self._current not in self._resident:
                self._current = new.name
        for victim in evicted:
            log.info("unloading %s to make room for %s (--max-models %d)", victim.name, new.name, self.max_models)
        for leaving in [old, *evicted]:
            if leaving is not None:
                self._retire(leaving)

    def _retire(self, resident: _Resident) -> None:
        """Take ``resident`` out (if still in) and unload it once its running requests have ended
        (at most ``RETIRE_WAIT_S``, on a thread of its own)."""
        with self._lock:
            if self._resident.get(resident.name) is resident:
                self._drop(resident.name)

        def unload_when_idle() -> None:
            with self._lock:
                self._lock.wait_for(lambda: resident.users == 0, timeout=RETIRE_WAIT_S)
            self._unload(resident.model)
            _release_memory()

        if resident.users == 0:  # nobody holds it: unloaded here and now
            unload_when_idle()
        else:
            threading.Thread(target=unload_when_idle, name=f"loadstar-retire-{resident.name}", daemon=True).start()

    def _drop(self, name: str) -> None:
        """Take resident ``name`` out of the list (under ``_lock``); the most recently used one left
        becomes current if it was."""
        del self._resident[name]
        if self._current == name:
            self._current = max(self._resident.values(), key=lambda r: r.last_used).name if self._resident else None

    def _make_room(self, leaving: _Resident, name: str, cancel: threading.Event | None) -> None:
        """Unload ``leaving`` so that ``name`` fits. It takes no new requests at once; its running ones get
        ``SWAP_WAIT_S`` to end (the load lock is held meanwhile, so that is short), then end with one
        line. A load cancelled meanwhile puts it back as it was; Ctrl+C unloads it and stops the load."""
        with self._lock:
            if self._resident.get(leaving.name) is not leaving:
                return
            was_current = self._current == leaving.name
            self._drop(leaving.name)
            deadline = time.monotonic() + SWAP_WAIT_S

            def cancelled() -> bool:
                return cancel is not None and cancel.is_set()

            while leaving.users and not cancelled() and not self._closed and (left := deadline - time.monotonic()) > 0:
                self._lock.wait(min(left, 0.25))  # ``use()`` notifies as each request lets go
            if cancelled() and not self._closed and leaving.name not in self._resident:
                self._resident[leaving.name] = leaving  # nothing was unloaded: all stays as it was
                if was_current:
                    self._current = leaving.name
                raise LoadCancelled(f"loading {name} was cancelled")
        self._unload(leaving.model, f"the model was unloaded to make room for {name}")
        _release_memory()
        if self._closed:  # Ctrl+C came while it drained
            raise LoadCancelled(f"not loading {name}: the server is shutting down")

    def _take_out(self, name: str, model: LoadedModel | None = None, reason: str = "the model was unloaded") -> bool:
        """Unload resident ``name`` now (only if it still is ``model``, when given): its running requests
        end with ``reason``."""
        with self._lock:
            resident = self._resident.get(name)
            if resident is None or (model is not None and resident.model is not model):
                return False
            self._drop(name)
        self._unload(resident.model, reason)
        del resident
        _release_memory()
        return True

    def close(self) -> None:
        """Unload every model (the server is shutting down): no crash is answered by a reload from now on."""
        self._closed = True
        for name in list(self._resident):
            self._take_out(name)

    def _worker_exited(self, model: CoreClient, reason: str) -> str:
        """A worker died (called on its reader thread, before its callers hear of it): what comes next, as
        the end of the line they get. Load it again once; after a second crash within a minute, leave it."""
        resident = next((r for r in list(self._resident.values()) if r.model is model), None)
        if resident is None or self._closed:
            return ""  # an old model, already replaced or unloaded, or the server is ending
        name = resident.name
        now = time.monotonic()
        again = now - self._crashed_at.get(name, -CRASH_WINDOW_S) < CRASH_WINDOW_S
        self._crashed_at[name] = now
        self._recovering[name] = threading.Event()
        then = f"; it crashed twice within {CRASH_WINDOW_S:.0f} s, so {name} stays unloaded" if again else f"; reloading {name}"
        threading.Thread(target=self._recover, args=(resident, reason, again, reason + then), name="loadstar-recover",
                         daemon=True).start()
        return then

    def _recover(self, crashed: _Resident, reason: str, again: bool, line: str) -> None:
        """``line``: what the crashed model's requests are told (whoever tells them first)."""
        name = crashed.name
        try:
            if again:
                self.problem = (f"{reason} twice within {CRASH_WINDOW_S:.0f} s, so the model stays unloaded "
                                "(load it again when the cause is fixed)")
                log.error("%s", self.problem)
                with self._load_lock:
                    self._take_out(name, crashed.model, line)
                return
            log.warning("%s: loading %s again", reason, name)
            try:
                self.load(name, crashed.loader, crashed.options, make_current=self._current == name)
            except LoadstarError as error:
                self.problem = f"{reason}, and loading {name} again failed: {error}"
                log.error("%s", self.problem)
                with self._load_lock:
                    self._take_out(name, crashed.model, line)
        finally:
            self._recovering.pop(name).set()

    def _unload(self, model: CoreClient, reason: str = "the model was unloaded") -> None:
        try:
            model.unload(reason)  # ends its core (and its worker): needs nothing else
        except Exception:
            log.exception("unloading %s failed", model.info.name)


@dataclass(eq=False)
class _Resident:
    """A loaded model, what it was loaded from and with, when it last answered, and who holds it now."""

    name: str
    model: CoreClient
    folder: ModelFolder
    loader: str
    options: dict[str, Any] | None
    last_used: float = field(default_factory=time.monotonic)
    users: int = 0  # lanes serving it now (``use``)
    gpu_bytes: int = 0  # what it took of the GPU's memory when it loaded (0: none, or not known)


def _on_gpu(options: Any, gpu: Callable[[], int | None]) -> bool:
    """Whether a load with ``options`` goes to a GPU: its device names one (any index), or is "auto"
    on a machine with one (``gpu()``: its free memory, None without one)."""
    device = str(getattr(options, "device", "cpu")).lower()
    return device.split(":")[0] in GPU_DEVICES or (device == "auto" and gpu() is not None)


def gpu_free_memory() -> int | None:
    """The free memory of the first NVIDIA GPU in bytes, from ``nvidia-smi`` (None: no GPU, or no
    way to tell); asked without importing torch into the server."""
    import shutil
    import subprocess

    tool = shutil.which("nvidia-smi")
    if tool is None:
        return None
    try:
        out = subprocess.run([tool, "--query-gpu=memory.free", "--format=csv,noheader,nounits"], capture_output=True,
                             text=True, timeout=10, check=True).stdout
        return int(out.split()[0]) * 1024 * 1024
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def _process_memory(model: LoadedModel) -> int:
    """What unloading ``model`` gives back: its worker's resident memory (a model on a thread here: 0, unknown)."""
    pid = model.pid if isinstance(model, CoreClient) else None
    if pid is None:
        return 0
    try:
        import psutil

        return int(psutil.Process(pid).memory_info().rss)
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
