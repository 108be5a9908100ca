"""A fake model and loaders for engine unit tests (the real model is tested elsewhere)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import MappingProxyType

from pydantic import BaseModel, ConfigDict

from loadstar import (
    Assessment,
    Availability,
    CancelToken,
    LoadedModel,
    LoadedModelInfo,
    ModelFolder,
    SamplingParams,
    SequenceStep,
    Settings,
    StreamPiece,
    hookimpl,
)
from loadstar.engine.facade import Engine
from loadstar.engine.plugins.host import PluginHost


class FakeModel(LoadedModel):
    """Replies with the words of ``reply`` (or ``<prompt> reply``), one token each, with a delay."""

    def __init__(self, name: str = "fake", reply: str | None = None, delay: float = 0.0, fail_after: int | None = None,
                 loader: str = "Fake"):
        self.info = LoadedModelInfo(name=name, loader=loader, device="cpu", dtype="none", context_length=100)
        self.reply = reply
        self.delay = delay
        self.fail_after = fail_after
        self.unloaded = False
        self.started = threading.Event()
        self.seeds: list[int] = []

    chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    special_tokens = MappingProxyType({"bos_token": "<s>", "eos_token": "</s>"})
    supported_params = frozenset({"temperature", "max_new_tokens", "seed"})

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def stream(self, prompt: str, params: SamplingParams, cancel: CancelToken, *, seed: int) -> Iterator[StreamPiece]:
        self.seeds.append(seed)
        self.started.set()
        words = (self.reply or prompt).split()[: params.max_new_tokens]
        for i, word in enumerate(words):
            if cancel.cancelled:
                return
            if self.fail_after is not None and i == self.fail_after:
                raise RuntimeError("the fake model broke")
            if self.delay:
                time.sleep(self.delay)
            yield StreamPiece(word + " ", 1)

    def unload(self) -> None:
        self.unloaded = True


class FakeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    device: str = "auto"


class FakeLoader:
    """A loader whose verdicts are set by the test."""

    Options = FakeOptions

    def __init__(self, name: str, *, available: bool = True, can_load: bool = True, priority: int = 50,
                 reason: str = "fake reason", fail_load: bool = False, raise_in_assess: bool = False,
                 load_seconds: float = 0.0):
        self.name = name
        self._available = available
        self._can_load = can_load
        self._priority = priority
        self._reason = reason
        self._fail_load = fail_load
        self._raise_in_assess = raise_in_assess
        self._load_seconds = load_seconds
        self.loaded: list[FakeModel] = []

    def availability(self) -> Availability:
        return Availability(self._available, "fake available" if self._available else "fake package missing")

    def assess(self, folder: ModelFolder) -> Assessment:
        if self._raise_in_assess:
            raise RuntimeError("assess exploded")
        if not folder.weight_files:
            return Assessment(False, "no weight files")
        return Assessment(self._can_load, self._reason, self._priority)

    def load(self, folder: ModelFolder, options: BaseModel) -> FakeModel:
        if self._load_seconds:
            time.sleep(self._load_seconds)
        if self._fail_load:
            raise RuntimeError(f"cannot read {folder.weight_files[0].path}")
        model = FakeModel(name=folder.name, loader=self.name)
        self.loaded.append(model)
        return model


class FakeBatch:
    """A ``DecodeBatch`` whose sequences write their prompt's words, one per step; it records who
    was in each step."""

    def __init__(self, model: FakeBatchModel) -> None:
        self._model = model
        self._words: dict[int, list[str]] = {}

    def add(self, key: int, prompt: str, params: SamplingParams, *, seed: int) -> None:
        if "refuse" in prompt:
            raise ValueError("the fake model refuses this prompt")
        self._words[key] = (self._model.reply or prompt).split()[: params.max_new_tokens]

    def step(self) -> dict[int, SequenceStep]:
        if self._model.delay:
            time.sleep(self._model.delay)
        self._model.steps.append(sorted(self._words))
        out = {}
        for key, words in list(self._words.items()):
            out[key] = SequenceStep(StreamPiece(words.pop(0) + " ", 1), done=not words[1:] and len(words) == 0)
            if not words:
                del self._words[key]
        return out

    def remove(self, key: int) -> None:
        self._words.pop(key, None)

    def close(self) -> None:
        self._words.clear()


class FakeBatchModel(FakeModel):
    """A fake model that batches: up to ``max_batch`` sequences per step."""

    def __init__(self, max_batch: int = 2, delay: float = 0.01, reply: str | None = None, name: str = "fake-batch") -> None:
        super().__init__(name=name, delay=delay, reply=reply)
        self.max_batch = max_batch
        self.steps: list[list[int]] = []  # the keys (request ids) decoded in each step
        self._batch = FakeBatch(self)

    def open_batch(self) -> FakeBatch:
        return self._batch


# Engines made by ``engine_with`` during the running test; conftest closes them after it (their model
# threads and workers end then), so no test needs a try/finally of its own.
OPEN_ENGINES: list[Engine] = []


def engine_with(tmp_path: Path, *loaders: object, **settings: object) -> Engine:
    """An engine whose only loaders are ``loaders`` (no built-in ones), models in ``tmp_path/models``.

    Models stay in this process unless ``model_workers=True`` is given: the fakes keep state the
    tests read (what was started, the seeds), and a worker would hold a copy of them."""
    settings.setdefault("model_workers", False)
    host = PluginHost([])
    for loader in loaders:
        class Plugin:
            @hookimpl
            def register_loaders(self, register, _loader=loader):  # type: ignore[no-untyped-def]
                register(_loader)

        assert host.register(Plugin(), name=loader.name)  # type: ignore[attr-defined]
    models = tmp_path / "models"
    models.mkdir(exist_ok=True)
    engine = Engine(Settings(models_dir=models, data_dir=tmp_path / "data", **settings), plugins=host)  # type: ignore[arg-type]
    OPEN_ENGINES.append(engine)
    return engine
