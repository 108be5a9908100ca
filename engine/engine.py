"""The engine: plugins, models and generation put together. The UI and the API talk to this."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from engine.default_model import DEFAULT_MODEL_NAME
from engine.download_jobs import DownloadManager
from engine.errors import BadRequestError, LoadstarError, ModelNotFoundError
from engine.generation import GenerationHandle, GenerationRequest, GenerationService
from engine.loader_api import LoadedModelInfo
from engine.model_manager import ModelManager
from engine.plugins import PluginHost
from engine.settings import Settings
from engine.user_settings import ModelChoice, UserSettingsStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StartupChoice:
    model: str
    loader: str | None
    why: str


class Engine:
    def __init__(self, settings: Settings, plugins: PluginHost | None = None) -> None:
        self.settings = settings
        self.plugins = plugins or PluginHost(third_party=settings.third_party_plugins)
        self.models = ModelManager(
            settings.models_dir,
            self.plugins,
            load_defaults={
                "device": settings.device,
                "scratch_dir": settings.data_dir / "derived",
                "allow_pt": settings.allow_pt,
            },
        )
        self.generation = GenerationService(self.models, self.models.model_thread)
        self.downloads = DownloadManager(settings.models_dir, settings.hub_endpoint, settings.hub_token)
        self.remembered = UserSettingsStore(settings.settings_file)

    # -- models --------------------------------------------------------------------------------

    def load_model(
        self, name: str, loader: str | None = None, options: dict[str, Any] | None = None
    ) -> LoadedModelInfo:
        """Load ``name``; with no loader and no options given, as it was loaded last time.

        Remembers the model (for the next start) and its loader and options (for its next load).
        """
        if loader is None and options is None:
            saved = self.saved_choice(name)
            if saved is not None:
                loader, options = saved.loader, saved.options
        info = self.models.load(name, loader, options)
        try:
            remembered = self.remembered.read()
            models = {**remembered.models, name: ModelChoice(loader=loader, options=dict(options or {}))}
            self.remembered.write(remembered.model_copy(update={"last_model": name, "last_loader": loader, "models": models}))
        except OSError as error:
            log.warning("could not remember the model choice: %s", error)
        return info

    def saved_choice(self, name: str) -> ModelChoice | None:
        """The loader and options ``name`` was last loaded with, if any (exact folder name)."""
        return self.remembered.read().models.get(name)

    def reload_model(self) -> LoadedModelInfo:
        """Load the current model again, with the same loader and options."""
        current = self.models.loaded
        if current is None:
            raise BadRequestError("no model is loaded")
        return self.load_model(current.name)

    def unload_model(self) -> bool:
        return self.models.unload()

    def startup_choice(self) -> StartupChoice:
        """Which model to load at start: --model, else the last one used, else the embedded default.

        Raises ``ModelNotFoundError`` for an unknown --model, and for a models folder with no models.
        """
        available = self.models.list_models()
        if self.settings.model is not None:
            self.models.inspect(self.settings.model)  # raises a one-line error for unknown names
            return StartupChoice(self.settings.model, self.settings.loader, "given with --model")
        if not available:
            raise ModelNotFoundError(
                f"no models in {self.settings.models_dir}: put a model folder there, "
                f"start with --no-model, or leave out --models-dir to use the embedded default model"
            )
        last = self.remembered.read()
        if last.last_model in available:
            return StartupChoice(last.last_model, self.settings.loader or last.last_loader, "used last time")
        if DEFAULT_MODEL_NAME in available:
            return StartupChoice(DEFAULT_MODEL_NAME, self.settings.loader, "the embedded default model")
        return StartupChoice(available[0], self.settings.loader, "the first model in the models folder")

    def load_startup_model(self) -> LoadedModelInfo | None:
        if not self.settings.load_model:
            return None
        choice = self.startup_choice()
        log.info("loading %s at start (%s)", choice.model, choice.why)
        saved = self.saved_choice(choice.model)
        options = saved.options if saved is not None and choice.loader in (None, saved.loader) else None
        return self.models.load(choice.model, choice.loader or (saved.loader if saved else None), options)

    # -- generation ----------------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> GenerationHandle:
        return self.generation.submit(request)

    def stop(self, owner: str) -> int:
        """Cancel ``owner``'s own generations (and nobody else's)."""
        return self.generation.cancel_owner(owner)

    def close(self) -> None:
        self.generation.close()
        try:
            self.models.unload()
        except LoadstarError:
            pass
        self.models.model_thread.stop()
