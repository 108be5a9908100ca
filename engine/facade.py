"""The engine: plugins, models and generation put together. The UI and the API talk to this."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from loadstar.engine.chat.attachments import AttachmentReader
from loadstar.engine.chat.characters import FORMAT as CHARACTER_FORMAT
from loadstar.engine.chat.characters import CharacterStore, character_from
from loadstar.engine.chat.conversations import Conversation, ConversationStore
from loadstar.engine.chat.format_detection import ChosenFormat, choose_format
from loadstar.engine.chat.presets import PresetStore, generation_config_defaults, model_system_message
from loadstar.engine.chat.prompt_formats import AUTO, COMPLETION, NAMED_FORMATS
from loadstar.engine.errors import BadRequestError, LoadstarError, ModelNotFoundError
from loadstar.engine.generation.pipeline import PreparedRequest, RequestPipeline
from loadstar.engine.generation.requests import GenerationRequest
from loadstar.engine.generation.service import GenerationHandle, GenerationService
from loadstar.engine.hub.downloads import HubClient
from loadstar.engine.hub.jobs import DownloadJob, DownloadManager
from loadstar.engine.metrics import MetricsSnapshot
from loadstar.engine.models.choice import LoaderCandidate
from loadstar.engine.models.default_model import DEFAULT_MODEL_NAME
from loadstar.engine.models.folder import ModelFolder
from loadstar.engine.models.loader_api import FEATURE_EMBEDDINGS, LoadedModel, LoadedModelInfo, Loader, TextEmbedding
from loadstar.engine.models.manager import ModelManager
from loadstar.engine.plugins.extension_api import PluginContext, UIContribution
from loadstar.engine.plugins.host import PluginHost, PluginInfo, PluginProblem
from loadstar.engine.sampling import ALL_PARAMS, SamplingParams, prompt_budget
from loadstar.engine.settings import Settings
from loadstar.engine.tools import ToolBox
from loadstar.engine.user_settings import ModelChoice, UserSettingsStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StartupChoice:
    model: str
    loader: str | None
    why: str


class Engine:
    def __init__(self, settings: Settings, plugins: PluginHost | None = None) -> None:
        self.settings = settings
        self.remembered = UserSettingsStore(settings.settings_file)
        # Each resident model's prompt format, keyed by its info object (a new load makes a new one).
        self._chosen_formats: dict[str, tuple[LoadedModelInfo, ChosenFormat]] = {}
        self.plugins = plugins or PluginHost(
            third_party=settings.third_party_plugins, enabled=self.remembered.read().extensions,
            disabled=settings.disabled_plugins,
        )
        if settings.extensions is not None:
            self._enable_only(settings.extensions)
        self.plugins.configure(settings)
        self.models = ModelManager(
            settings.models_dir,
            self.plugins.loaders,
            load_defaults={
                "device": settings.device,
                "scratch_dir": settings.data_dir / "derived",
                "allow_pt": settings.allow_pt,
                **({"max_batch": settings.max_batch} if settings.max_batch is not None else {}),
            },
            workers=settings.model_workers,
            log_level=logging.getLevelName(logging.getLogger("loadstar").getEffectiveLevel()),
            max_models=settings.max_models,
            deadline=settings.worker_deadline,
        )
        self._closing = threading.Event()
        if settings.idle_unload_minutes is not None:
            threading.Thread(target=self._unload_idle_models, args=(settings.idle_unload_minutes * 60,),
                             name="loadstar-idle-unload", daemon=True).start()
        self.pipeline = RequestPipeline(self.plugins, self.prompt_format)
        self.generation = GenerationService(self.models, self.pipeline)
        self.downloads = DownloadManager(settings.models_dir, settings.hub_endpoint, settings.hub_token)
        self.presets = PresetStore(settings.data_dir / "presets")
        self.conversations = ConversationStore(settings.data_dir / "conversations")
        self.characters = CharacterStore(settings.data_dir / "characters", self.plugins.characters)
        self.attachments = AttachmentReader()  # each upload parsed once, in a child process with limits
        self.tools = ToolBox(self.plugins.tools, self.plugins.enabled_names, self.plugins.shutdown)

    # -- conversations with their characters ---------------------------------------------------

    def export_conversation(self, user: str | None, conversation: Conversation) -> Path:
        """A conversation's export file; one with a character carries the character too."""
        character = self.characters.get(user, conversation.character)
        extra = {"character_card": character.model_dump(mode="json")} if character else None
        return self.conversations.export_file(user, conversation, extra)

    def import_conversation(self, user: str | None, path: Path) -> Conversation:
        """Import an exported conversation; the character it carries is the user's own one of the
        same name and description, else saved as a new character."""

        def adopt(raw: dict[str, Any]) -> str | None:
            card = raw.get("character_card")
            if not isinstance(card, dict):
                return None
            try:
                character = character_from({**card, "format": CHARACTER_FORMAT}, "a conversation's import")
            except LoadstarError:
                return None
            same = next((c for c in self.characters.all(user)
                         if (c.name, c.context, c.greeting) == (character.name, character.context, character.greeting)), None)
            return same.id if same else self.characters.save(user, character).id

        return self.conversations.import_file(user, path, adopt)

    # -- models --------------------------------------------------------------------------------

    def load_model(
        self, name: str, loader: str | None = None, options: dict[str, Any] | None = None,
        cancel: threading.Event | None = None,
    ) -> LoadedModelInfo:
        """Load ``name``; with no loader and no options given, as it was loaded last time.

        Remembers the model (for the next start), its loader and options (for its next load) and
        how long the load took (for the next load's progress bar). ``cancel``: see ModelManager.load.
        """
        if loader is None and options is None:
            saved = self.saved_choice(name)
            if saved is not None:
                loader, options = saved.loader, saved.options
        started = time.monotonic()
        info = self.models.load(name, loader, options, cancel)
        try:
            remembered = self.remembered.read()
            previous = remembered.models.get(name)
            choice = ModelChoice(loader=loader, options=dict(options or {}),
                                 prompt_format=previous.prompt_format if previous else None,
                                 load_seconds=round(time.monotonic() - started, 1))
            models = {**remembered.models, name: choice}
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

    def unload_model(self, name: str | None = None) -> bool:
        """Unload model ``name`` (None: the current one); False if it was not loaded."""
        return self.models.unload(name)

    def models_resident(self, name: str) -> bool:
        """Whether model ``name`` is loaded (current or not)."""
        return self.models.is_resident(name)

    def resident_models(self) -> list[LoadedModelInfo]:
        """Every loaded model (up to --max-models), the current one first."""
        return self.models.resident()

    def ensure_loaded(self, name: str) -> LoadedModelInfo:
        """Model ``name`` loaded (as it was last time), without making it the current one: the API's
        --load-on-request. A resident model is used as it is; else the least recently used may go."""
        if self.models.is_resident(name):
            return self.models.ensure_resident(name)
        saved = self.saved_choice(name)
        return self.models.ensure_resident(name, saved.loader if saved else None, saved.options if saved else None)

    def _unload_idle_models(self, idle_seconds: float) -> None:
        while not self._closing.wait(min(30.0, idle_seconds / 4)):
            try:
                self.models.unload_idle(idle_seconds)
            except Exception:
                log.exception("unloading idle models failed")

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
        loader = choice.loader or (saved.loader if saved else None)
        try:
            return self.models.load(choice.model, loader, options)
        except LoadstarError as error:
            remembered = (options or (loader and not self.settings.loader)) and saved is not None
            if not remembered:
                raise
            raise type(error)(
                f"{error} (loader and options remembered for {choice.model} in {self.remembered.path}: "
                f"start with --loader NAME, or remove its entry from that file)"
            ) from None

    # -- prompts and parameters ----------------------------------------------------------------

    def prompt_format(self, model: LoadedModel) -> ChosenFormat:
        """The loaded model's prompt format: the user's pick, its own template, a guess, or completion.

        Worked out once per load (it reads settings.json and the model card), not per request.
        """
        cached = self._chosen_formats.get(model.info.name)
        if cached is not None and cached[0] is model.info:
            return cached[1]
        elsewhere = model.chat_rendered_by  # e.g. a remote server with its own template
        if elsewhere:
            chosen = ChosenFormat(COMPLETION, f"chats go to {elsewhere} as messages; it applies its own chat template",
                                  source="remote")
        else:
            folder = self.models.folder_of(model.info.name)
            saved = self.saved_choice(model.info.name)
            chosen = choose_format(
                own_template=model.chat_template,
                own_source=folder.chat_template_source if folder else None,
                folder=folder.path if folder else None,
                pinned=saved.prompt_format if saved else None,
            )
            if folder is not None:
                chosen = replace(chosen, system_message=model_system_message(folder.path))
        self._chosen_formats[model.info.name] = (model.info, chosen)
        return chosen

    def loaded_prompt_format(self) -> ChosenFormat | None:
        with self.models.use() as model:
            return self.prompt_format(model) if model is not None else None

    def set_prompt_format(self, name: str) -> ChosenFormat | None:
        """Pin a named prompt format (or ``auto``) for the loaded model, remembered by folder name."""
        if name != AUTO and name not in NAMED_FORMATS:
            raise BadRequestError(f"unknown prompt format '{name}' (known: auto, {', '.join(NAMED_FORMATS)})")
        loaded = self.models.loaded
        if loaded is None:
            raise BadRequestError("no model is loaded")
        remembered = self.remembered.read()
        previous = remembered.models.get(loaded.name) or ModelChoice()
        choice = previous.model_copy(update={"prompt_format": None if name == AUTO else name})
        self.remembered.write(remembered.model_copy(update={"models": {**remembered.models, loaded.name: choice}}))
        self._chosen_formats.pop(loaded.name, None)
        return self.loaded_prompt_format()

    def preview(self, request: GenerationRequest) -> PreparedRequest:
        """The exact prompt ``request`` would send, its token count and notices, without generating."""
        with self.models.use() as model:
            if model is None:
                raise BadRequestError("no model is loaded: load one first")
            return self.pipeline.prepare(model, request, [])

    def default_params(self) -> SamplingParams:
        """Loadstar's defaults with the loaded model's generation_config.json on top."""
        folder = self.models.loaded_folder
        return SamplingParams.model_validate(generation_config_defaults(folder.path) if folder else {})

    def preset_params(self, name: str, user: str | None = None) -> SamplingParams:
        """The model's defaults with preset ``name`` on top."""
        return self.default_params().model_copy(update=self.presets.for_user(user).values(name))

    # -- extensions ----------------------------------------------------------------------------

    def _enable_only(self, names: tuple[str, ...]) -> None:
        """--extensions: exactly these optional plugins on, the others off (remembered)."""
        optional = {p.name for p in self.plugins.plugins if p.optional}
        unknown = sorted(set(names) - optional)
        if unknown:
            raise BadRequestError(
                f"unknown extension {', '.join(unknown)} (known: {', '.join(sorted(optional)) or 'none'})"
            )
        choices = {name: name in names for name in optional}
        for name, on in choices.items():
            self.plugins.set_enabled(name, on)
        try:
            self.remembered.update(extensions=choices)
        except OSError as error:
            log.warning("could not remember the extension choice: %s", error)

    def set_extension_enabled(self, name: str, on: bool) -> None:
        """Turn an extension on or off now and for the next start."""
        self.plugins.set_enabled(name, on)  # a plugin switched on gets configure() there (historic)
        try:
            self.remembered.update(extensions={**self.remembered.read().extensions, name: on})
        except OSError as error:
            log.warning("could not remember the extension choice: %s", error)

    # -- what the UI and the API ask (they use these, never the parts behind them) ------------

    @property
    def loaded(self) -> LoadedModelInfo | None:
        """The model loaded now, or None."""
        return self.models.loaded

    @property
    def model_problem(self) -> str | None:
        """Why the model is not loaded after its worker crashed (one line), or None."""
        return self.models.problem

    def list_models(self) -> list[str]:
        """Model folder names in the models folder."""
        return self.models.list_models()

    def inspect(self, name: str) -> ModelFolder:
        """What a model folder holds (cached until the folder changes); raises for unknown names."""
        return self.models.inspect(name)

    def candidates(self, name: str, pinned: str | None = None) -> list[LoaderCandidate]:
        """Every loader's verdict on model ``name``, best first."""
        return self.models.candidates(name, pinned)

    def rank(self, folder: ModelFolder, pinned: str | None = None) -> list[LoaderCandidate]:
        """Every loader's verdict on an inspected folder, best first."""
        return self.models.rank(folder, pinned)

    def loaders(self) -> dict[str, Loader]:
        """The registered loaders by name."""
        return self.plugins.loaders()

    def loader_names(self) -> list[str]:
        return self.models.loader_names()

    def honoured_params(self) -> tuple[frozenset[str], str | None]:
        """The sampling parameters the loaded model honours, and its loader's name (all, None: no model)."""
        with self.models.use() as model:
            if model is None:
                return ALL_PARAMS, None
            return model.supported_params, model.info.loader

    def has_work(self, owner: str) -> bool:
        """Whether ``owner`` has a generation waiting or running."""
        return self.generation.has_work(owner)

    @property
    def waiting(self) -> int:
        """Generations waiting for their turn."""
        return self.generation.waiting

    def metrics(self) -> MetricsSnapshot:
        """Generation counters since the start."""
        return self.generation.metrics.snapshot()

    def hub_client(self, token: str | None = None) -> HubClient:
        """A client for the configured Hub (a user's token, else the server's)."""
        return self.downloads.client(token)

    def start_download(self, name: str, token: str | None = None, gguf_file: str | None = None) -> DownloadJob:
        return self.downloads.start(name, token, gguf_file)

    def download_job(self, job_id: int) -> DownloadJob | None:
        return self.downloads.get(job_id)

    def plugin_list(self) -> list[PluginInfo]:
        """Every registered plugin, enabled or not."""
        return self.plugins.plugins

    def plugin_enabled(self, name: str) -> bool:
        return self.plugins.is_enabled(name)

    def plugin_problems(self) -> list[PluginProblem]:
        """Plugins that failed to load, and extensions turned off after failing."""
        return self.plugins.problems

    def ui_contributions(self) -> list[tuple[str, UIContribution]]:
        """(extension name, contribution) for every extension's UI, enabled or not."""
        return self.plugins.ui_contributions()

    def plugin_context(self, components: Mapping[str, Any]) -> PluginContext:
        """What an extension's UI gets: a few services and the page's named components."""
        return PluginContext(settings=self.settings, loaded_model=lambda: self.models.loaded,
                             metrics=self.metrics, components=dict(components))

    # -- generation ----------------------------------------------------------------------------

    def embed(self, texts: list[str], model: str | None = None) -> tuple[LoadedModelInfo, list[TextEmbedding]]:
        """Embeddings of ``texts`` from loaded model ``model`` (None: the current one), answered by its
        core between two steps; ``BadRequestError`` when it gives none or a text is too long."""
        with self.models.use(model) as loaded:
            if loaded is None:
                raise BadRequestError(f"{model} is not loaded" if model else "no model is loaded: load one first")
            if FEATURE_EMBEDDINGS not in loaded.info.features:
                raise BadRequestError(f"{loaded.info.loader} gives no embeddings")
            return loaded.info, loaded.embed(list(texts))

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens each text takes in the loaded model's tokenizer."""
        with self.models.use() as model:
            if model is None:
                raise BadRequestError("no model is loaded: load one first")
            return [model.count_tokens(t) for t in texts]

    def prompt_room(self, request: GenerationRequest) -> tuple[int | None, PreparedRequest]:
        """Prompt tokens ``request`` leaves free in the context (None: the context length is unknown)."""
        with self.models.use() as model:
            if model is None:
                raise BadRequestError("no model is loaded: load one first")
            prepared = self.pipeline.prepare(model, request, [])
            budget = prompt_budget(prepared.params, model.info.context_length)
        return (None if budget is None else budget - prepared.prompt_tokens), prepared

    def submit(self, request: GenerationRequest) -> GenerationHandle:
        return self.generation.submit(request)

    def stop(self, owner: str) -> int:
        """Cancel ``owner``'s own generations (and nobody else's)."""
        return self.generation.cancel_owner(owner)

    def close(self) -> None:
        self._closing.set()
        self.generation.close()
        self.models.close()
        self.pipeline.close()
        self.tools.close()
