"""Model tab handlers: list, inspect, rank loaders, load, unload. Plain functions over the engine."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from pydantic import ValidationError

from loadstar.engine.errors import LoadCancelled, LoadstarError, problem_line
from loadstar.engine.facade import Engine
from loadstar.engine.models.choice import LoaderCandidate
from loadstar.engine.models.folder import ModelFolder, format_size
from loadstar.engine.models.manager import gpu_free_memory

AUTO_LOADER = "auto"


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def candidates_table(candidates: list[LoaderCandidate]) -> str:
    """Markdown table of every loader's verdict, best first."""
    if not candidates:
        return "No loaders are registered."
    rows = ["| Loader | Verdict | Priority | Reason |", "|---|---|---|---|"]
    for c in candidates:
        verdict = c.verdict + (" (pinned)" if c.pinned else "")
        priority = str(c.priority) if c.usable else "–"
        rows.append(f"| {_escape(c.loader)} | {verdict} | {priority} | {_escape(c.reason)} |")
    return "\n".join(rows)


def folder_details(folder: ModelFolder) -> str:
    lines = [
        f"**{folder.name}** — {folder.summary()}",
        f"- Weights: {', '.join(f'{w.path} ({format_size(w.size)})' for w in folder.weight_files) or 'none'}",
        f"- Chat template: {folder.chat_template_source or 'none'}",
        f"- Context length: {folder.context_length or 'unknown'}",
    ]
    if folder.layers:  # what llama.cpp's "Layers on the GPU" counts
        lines.append(f"- Layers: {folder.layers}")
    if folder.quantization:
        lines.append(f"- Quantization: {folder.quantization.describe()} (from {folder.quantization.source})")
    lines.extend(f"- ⚠️ {problem}" for problem in folder.problems)
    return "\n".join(lines)


def loading_line(name: str, loader: str, seconds: float, expected: float | None) -> str:
    """The status while loading: what, how long so far, and a bar. The bar measures time against
    the model's last load (no loader reports its own progress); the first load shows a bar that
    only says it is busy."""
    head = f"⏳ Loading **{name}**{loader}… {int(seconds)} s"
    if expected:
        bar = f'<progress class="load-bar" value="{min(seconds, expected * 0.99):.1f}" max="{expected:.1f}"></progress>'
        return f"{head} of about {expected:.0f} s (its last load)\n\n{bar}"
    return f'{head} (the current model answers until it is ready)\n\n<progress class="load-bar"></progress>'


class ModelHandlers:
    """One per page build, shared by its sessions: the model is the server's, so Cancel stops
    whichever load is running."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._loads: set[threading.Event] = set()
        self._loads_lock = threading.Lock()

    def model_names(self) -> list[str]:
        return self.engine.list_models()

    def loader_choices(self) -> list[str]:
        return [AUTO_LOADER, *self.engine.loader_names()]

    def loaded_status(self) -> str:
        info = self.engine.loaded
        if info is None:
            return "No model is loaded."
        extra = f", {info.details}" if info.details else ""
        return f"Loaded: **{info.name}** with {info.loader} on {info.device} ({info.dtype}{extra})."

    def initial_model(self) -> str | None:
        loaded = self.engine.loaded
        names = self.model_names()
        if loaded is not None and loaded.name in names:
            return loaded.name
        return names[0] if names else None

    def describe(self, name: str | None, loader: str | None) -> tuple[str, str, list[tuple[str, str]]]:
        """(folder details, loader candidates table, loader dropdown choices) for the picked model.

        Each dropdown choice is (label, loader name); the label carries the verdict and reason.
        """
        plain_choices = [(name_, name_) for name_ in self.loader_choices()]
        if not name:
            return "No model selected. Put model folders into the models folder and press Refresh.", "", plain_choices
        pinned = None if loader in (None, AUTO_LOADER) else loader
        try:
            folder = self.engine.inspect(name)
            candidates = self.engine.rank(folder, pinned)
        except LoadstarError as error:
            return f"⚠️ {error}", "", plain_choices
        best = next((c for c in candidates if c.usable), None)
        auto_label = f"auto → {best.loader}" if best else "auto (no loader can load this)"
        choices = [(auto_label, AUTO_LOADER)] + [(c.describe(), c.loader) for c in candidates]
        return folder_details(folder), candidates_table(candidates), choices

    def saved_loader(self, name: str | None) -> str:
        """The loader this model was pinned to last time, else auto (exact folder name)."""
        saved = self.engine.saved_choice(name) if name else None
        return saved.loader if saved is not None and saved.loader else AUTO_LOADER

    def resolved_loader(self, name: str | None, loader: str | None) -> str | None:
        """The loader that Load would use: the pinned one, else the best candidate."""
        if not name:
            return None
        if loader not in (None, AUTO_LOADER):
            return loader
        try:
            return next((c.loader for c in self.engine.candidates(name, None) if c.usable), None)
        except LoadstarError:
            return None

    def saved_options(self, name: str | None) -> dict:
        saved = self.engine.saved_choice(name) if name else None
        return dict(saved.options) if saved is not None else {}

    def load(self, name: str | None, loader: str | None, allow_pt: bool = False,
             options: dict | None = None) -> Iterator[str]:
        """Status lines while loading: "Loading X with L… N s" (the previous model answers until
        the new one is ready), then the loaded model, or the one-line reason it failed.

        ``options``: the loader options set in the tab; None loads the model as it was last time.
        """
        if not name:
            yield "⚠️ Pick a model first."
            return
        pinned = None if loader in (None, AUTO_LOADER) else loader
        try:
            pt = self._options_for(name, pinned, allow_pt)
            if pt is not None:
                options = {**(options or {}), **pt}
            best = next((c for c in self.engine.candidates(name, pinned) if c.usable), None)
        except LoadstarError as error:
            yield f"⚠️ {error}\n\n{self.loaded_status()}"
            return
        with_loader = f" with {best.loader}" if best else ""
        saved = self.engine.saved_choice(name)
        expected = saved.load_seconds if saved is not None and saved.load_seconds else None
        cancel = threading.Event()

        def work() -> None:
            if pinned is None and options is None:
                self.engine.load_model(name, cancel=cancel)  # as it was loaded last time, if it was
            else:
                self.engine.load_model(name, pinned, options or {}, cancel=cancel)

        started = time.monotonic()
        with self._loads_lock:
            self._loads.add(cancel)
        try:
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ui-load") as pool:
                job = pool.submit(work)
                while True:
                    if cancel.is_set():
                        yield f"⏹ Cancelling: {name} is dropped once its loader is done.\n\n{self.loaded_status()}"
                    else:
                        yield loading_line(name, with_loader, time.monotonic() - started, expected)
                    try:
                        job.result(timeout=0.5)
                        break
                    except FutureTimeout:
                        continue
                    except LoadCancelled:
                        yield f"⏹ Loading {name} was cancelled. {self.loaded_status()}"
                        return
                    except LoadstarError as error:
                        yield f"⚠️ {error}\n\n{self.loaded_status()}"
                        return
        finally:
            with self._loads_lock:
                self._loads.discard(cancel)
        yield self.loaded_status()

    def estimate(self, name: str | None, loader: str | None, options: dict) -> str:
        """What loading ``name`` with ``loader`` and ``options`` would take, as one line."""
        if not name or not loader:
            return ""
        plugin = self.engine.loaders().get(loader)
        estimate = getattr(plugin, "estimate_memory", None)
        if plugin is None or estimate is None:
            return f"Memory: {loader} gives no estimate before loading."
        try:
            folder = self.engine.inspect(name)
            validated = plugin.Options.model_validate(options)
            found = estimate(folder, validated)
        except ValidationError as error:
            return f"⚠️ {loader} option {problem_line(error)}"
        except LoadstarError as error:
            return f"⚠️ {error}"
        if found is None:
            return f"Memory: {loader} gives no estimate for this model before loading."
        import psutil

        gpu_free = gpu_free_memory() if found.gpu_share else None
        return f"Memory: {found.describe(psutil.virtual_memory().available, gpu_free)}"

    def cancel_load(self) -> str | None:
        """Cancel the running loads; None when nothing is loading."""
        with self._loads_lock:
            running = list(self._loads)
        for cancel in running:
            cancel.set()
        return "⏹ Cancelling…" if running else None

    def reload(self) -> str:
        try:
            self.engine.reload_model()
        except LoadstarError as error:
            return f"⚠️ {error}\n\n{self.loaded_status()}"
        return self.loaded_status()

    def _options_for(self, name: str, pinned: str | None, allow_pt: bool) -> dict | None:
        """The .pt opt-in goes to the loader that will load the model, if it takes it."""
        if not allow_pt:
            return None
        candidates = self.engine.candidates(name, pinned)
        chosen = next((c for c in candidates if c.usable), None)
        loaders = self.engine.loaders()
        if chosen is not None and "allow_pt" in loaders[chosen.loader].Options.model_fields:
            return {"allow_pt": True}
        return None

    def unload(self) -> str:
        unloaded = self.engine.unload_model()
        return "Model unloaded." if unloaded else "No model was loaded."
