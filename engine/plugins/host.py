"""The plugin host: one typed wrapper around pluggy's manager.

Plugins arrive two ways: Loadstar's own extensions from the ``extensions/`` package (one module or
folder each) and every package's plugins through the ``loadstar`` entry-point group (the built-in
loaders come this way too, exactly as third-party ones do). Loading is guarded per plugin: a plugin
that fails to import, registers no hooks or names an unknown hook is recorded in ``problems`` and
left out. A plugin that raises inside a hook is disabled for the rest of the session and the
caller is handed a one-line notice for the user. Callers use the typed methods here, one per
hook, never ``pm.hook.*``.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib.metadata import EntryPoint, PackageNotFoundError, entry_points, version
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pluggy

from loadstar.engine.errors import LoadstarError, one_line
from loadstar.engine.models.loader_api import Loader
from loadstar.engine.plugins import hookspecs

if TYPE_CHECKING:
    from loadstar.engine.plugins.extension_api import ReplyDraft, RequestDraft, UIContribution
    from loadstar.engine.settings import Settings

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = hookspecs.PROJECT_NAME
OUR_DISTRIBUTION = "loadstar"
EXTENSIONS_PACKAGE = "loadstar.extensions"
# Built-in extensions that are on until the user turns them off; the others wait to be enabled.
ENABLED_BY_DEFAULT = frozenset({"remote_engine"})


@dataclass(frozen=True)
class PluginProblem:
    plugin: str
    stage: str  # "import", "register", or the hook's name
    message: str

    def describe(self) -> str:
        if self.stage in ("import", "register"):
            return f"plugin '{self.plugin}' failed at {self.stage}: {self.message}"
        return f"extension '{self.plugin}' failed in {self.stage} and is disabled for this session: {self.message}"


@dataclass(frozen=True)
class PluginInfo:
    name: str
    distribution: str  # the package it came from, "loadstar" for built-ins
    version: str
    hooks: tuple[str, ...]
    kind: str = "plugin"  # "extension" for extensions/<name>, "plugin" for entry points
    description: str = ""

    @property
    def built_in(self) -> bool:
        return self.distribution == OUR_DISTRIBUTION

    @property
    def optional(self) -> bool:
        """Whether the user may turn it off (everything but Loadstar's own loaders)."""
        return self.kind == "extension" or not self.built_in


class PluginHost:
    """Owns one pluggy manager. Tests build a fresh host each; nothing here is global."""

    def __init__(
        self,
        entry_points_: Iterable[EntryPoint] | None = None,
        *,
        third_party: bool = True,
        builtin_extensions: bool | None = None,
        enabled: Mapping[str, bool] | None = None,
    ) -> None:
        """``entry_points_`` defaults to the installed ``loadstar`` group; ``third_party=False``
        loads only Loadstar's own plugins (the way out of a broken third-party plugin).
        ``builtin_extensions`` scans ``extensions/`` (default: when ``entry_points_`` is not given).
        ``enabled`` maps plugin names to on/off, overriding each plugin's default."""
        self._pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self._pm.add_hookspecs(hookspecs)
        self._entry_points = entry_points_
        self._third_party = third_party
        self._scan_extensions = entry_points_ is None if builtin_extensions is None else builtin_extensions
        self._choices = dict(enabled or {})
        self._failed: set[str] = set()
        self._loaded = False
        self._infos: dict[str, PluginInfo] = {}
        self._problems: list[PluginProblem] = []
        self._loaders: dict[str, Loader] | None = None
        self._settings: Settings | None = None
        self._configured: set[str] = set()

    # -- discovery -------------------------------------------------------------------------

    def load(self) -> None:
        """Import and register every plugin, once."""
        if self._loaded:
            return
        self._loaded = True
        if self._scan_extensions:
            self._load_builtin_extensions()
        eps = self._entry_points if self._entry_points is not None else entry_points(group=ENTRY_POINT_GROUP)
        for ep in sorted(eps, key=lambda e: e.name):
            dist = ep.dist.name if ep.dist is not None else OUR_DISTRIBUTION
            if not self._third_party and dist != OUR_DISTRIBUTION:
                log.info("third-party plugins are off: skipping %s from %s", ep.name, dist)
                continue
            if ep.name in self._infos:
                continue  # an extensions/ module also listed as an entry point
            try:
                plugin = ep.load()
            except Exception as error:
                self._report(ep.name, "import", error)
                continue
            version = ep.dist.version if ep.dist is not None else ""
            self.register(plugin, name=ep.name, distribution=dist, version=version)

    def _load_builtin_extensions(self) -> None:
        try:
            package = importlib.import_module(EXTENSIONS_PACKAGE)
        except ImportError as error:
            self._report(EXTENSIONS_PACKAGE, "import", error)
            return
        for module_info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
            if module_info.name.startswith("_"):
                continue
            try:
                module = importlib.import_module(f"{EXTENSIONS_PACKAGE}.{module_info.name}")
                # An extension with state offers create_plugin(): one object per host, no module globals.
                factory = getattr(module, "create_plugin", None)
                plugin = factory() if callable(factory) else module
            except Exception as error:
                self._report(module_info.name, "import", error)
                continue
            self.register(plugin, name=module_info.name, distribution=OUR_DISTRIBUTION, version=_our_version(),
                          kind="extension")

    def register(
        self, plugin: ModuleType | object, *, name: str, distribution: str = "", version: str = "", kind: str = "plugin"
    ) -> bool:
        """Register one plugin object; False (and a recorded problem) if it is unusable."""
        try:
            self._pm.register(plugin, name=name)
        except Exception as error:  # duplicate name, bad hookimpl signature, ...
            self._report(name, "register", error)
            return False
        try:
            self._pm.check_pending()  # a misspelled hook fails loudly here, not silently later
        except pluggy.PluginValidationError as error:
            self._pm.unregister(name=name)
            self._report(name, "register", error)
            return False
        hooks = tuple(sorted(caller.name for caller in self._pm.get_hookcallers(plugin) or []))
        if not hooks:
            self._pm.unregister(name=name)
            self._problems.append(
                PluginProblem(name, "register", "it implements no hooks (forgotten @hookimpl or wrong project name?)")
            )
            return False
        doc = (getattr(plugin, "__doc__", None) or "").strip().splitlines()
        self._infos[name] = PluginInfo(
            name, distribution or OUR_DISTRIBUTION, version, hooks, kind, doc[0] if doc else ""
        )
        self._loaders = None  # recompute on next use
        self._configure_late(name)
        return True

    @property
    def plugins(self) -> list[PluginInfo]:
        self.load()
        return sorted(self._infos.values(), key=lambda p: p.name)

    def get(self, name: str) -> object | None:
        """The registered plugin object (a module, or what an extension's create_plugin() made)."""
        self.load()
        return self._pm.get_plugin(name)

    @property
    def problems(self) -> list[PluginProblem]:
        self.load()
        return list(self._problems)

    # -- enabling --------------------------------------------------------------------------

    def is_enabled(self, name: str) -> bool:
        self.load()
        info = self._infos.get(name)
        if info is None or name in self._failed:
            return False
        if not info.optional:
            return True
        if name in self._choices:
            return self._choices[name]
        return info.kind != "extension" or name in ENABLED_BY_DEFAULT

    def set_enabled(self, name: str, on: bool) -> None:
        """Turn an optional plugin on or off for this process (the caller remembers the choice)."""
        self.load()
        info = self._infos.get(name)
        if info is None:
            raise KeyError(f"no plugin named '{name}' (known: {', '.join(sorted(self._infos)) or 'none'})")
        if not info.optional:
            raise ValueError(f"'{name}' is one of Loadstar's own loaders and cannot be turned off")
        self._choices[name] = on
        if on:
            self._failed.discard(name)  # the user asks for another chance
        self._loaders = None
        self._configure_late(name)

    def enabled_names(self) -> list[str]:
        return [p.name for p in self.plugins if self.is_enabled(p.name)]

    # -- hooks -------------------------------------------------------------------------------

    def configure(self, settings: Settings) -> None:
        """Hand the settings to every plugin now, and to each plugin enabled later (historic)."""
        self._settings = settings
        for name in self.enabled_names():
            self._configure_late(name)

    def _configure_late(self, name: str) -> None:
        if self._settings is None or name in self._configured or not self.is_enabled(name):
            return
        self._configured.add(name)
        self._call("configure", {"settings": self._settings}, only=name)

    def loaders(self) -> dict[str, Loader]:
        """Every registered loader by name (the ``register_loaders`` hook), computed once."""
        self.load()
        if self._loaders is None:
            found: dict[str, Loader] = {}
            pending: dict[str, dict[str, Loader]] = {}

            def register_from(plugin_name: str) -> Callable[[Loader], None]:
                mine = pending.setdefault(plugin_name, {})

                def register(loader: Loader) -> None:
                    if not isinstance(getattr(loader, "name", None), str) or not loader.name:
                        raise TypeError(f"loader {loader!r} has no name")
                    if any(loader.name in registered for registered in pending.values()):
                        raise ValueError(f"a loader named '{loader.name}' is already registered")
                    mine[loader.name] = loader

                return register

            for plugin_name, ok, _ in self._call_each(
                "register_loaders", lambda plugin_name: {"register": register_from(plugin_name)}
            ):
                if ok:  # a plugin that raised half-way registers nothing
                    found.update(pending.get(plugin_name, {}))
            self._loaders = found
        return dict(self._loaders)

    def modify_request(self, request: RequestDraft, notices: list[str]) -> None:
        self._call("modify_request", {"request": request}, notices=notices)

    def render_prompt(self, notices: list[str], **kwargs: Any) -> str | None:
        """The first extension's prompt for a chat, or None for the engine's own rendering."""
        return self._first("render_prompt", kwargs, notices, lambda result: isinstance(result, str))

    def generate(self, notices: list[str], **kwargs: Any) -> bool:
        """True if an extension produced the reply itself."""
        return bool(self._first("generate", kwargs, notices, lambda result: result is True))

    def modify_reply(self, reply: ReplyDraft, notices: list[str]) -> None:
        self._call("modify_reply", {"reply": reply}, notices=notices)

    def ui_contributions(self) -> list[tuple[str, UIContribution]]:
        """(plugin name, contribution) for every plugin, enabled or not; the UI shows the enabled ones."""
        self.load()
        found: list[tuple[str, UIContribution]] = []
        for impl in self._impls("webui_contribution"):
            mine: list[UIContribution] = []
            try:
                impl.function(register=mine.append)
            except Exception as error:
                self._fail(impl.plugin_name, "webui_contribution", error, None)
                continue
            found.extend((impl.plugin_name, contribution) for contribution in mine)
        return found

    # -- helpers -----------------------------------------------------------------------------

    def _impls(self, hook_name: str) -> list[Any]:
        # pluggy's own order (last registered first), kept so calls are predictable.
        return list(reversed(getattr(self._pm.hook, hook_name).get_hookimpls()))

    def _call(
        self, hook_name: str, kwargs: dict[str, Any], *, notices: list[str] | None = None, only: str | None = None
    ) -> None:
        for impl in self._impls(hook_name):
            if (only is not None and impl.plugin_name != only) or not self.is_enabled(impl.plugin_name):
                continue
            try:
                impl.function(**{arg: kwargs[arg] for arg in impl.argnames})
            except LoadstarError:
                raise
            except Exception as error:
                self._fail(impl.plugin_name, hook_name, error, notices)

    def _first(
        self, hook_name: str, kwargs: dict[str, Any], notices: list[str], answered: Callable[[Any], bool]
    ) -> Any:
        self.load()
        for impl in self._impls(hook_name):
            if not self.is_enabled(impl.plugin_name):
                continue
            try:
                result = impl.function(**{arg: kwargs[arg] for arg in impl.argnames})
            except LoadstarError:
                raise  # a one-line error about this request (a server gone, a bad template), not a bug
            except Exception as error:
                self._fail(impl.plugin_name, hook_name, error, notices)
                continue
            if answered(result):
                return result
        return None

    def _call_each(
        self, hook_name: str, kwargs_for: Callable[[str], dict[str, Any]]
    ) -> list[tuple[str, bool, Any]]:
        """Call each enabled implementation on its own, so one plugin's error spares the others.

        Returns (plugin name, succeeded, result) per implementation, in pluggy's call order.
        """
        outcomes = []
        for impl in self._impls(hook_name):
            if not self.is_enabled(impl.plugin_name):
                continue
            kwargs = kwargs_for(impl.plugin_name)
            try:
                result = impl.function(**{arg: kwargs[arg] for arg in impl.argnames})
            except Exception as error:
                self._fail(impl.plugin_name, hook_name, error, None)
                outcomes.append((impl.plugin_name, False, None))
            else:
                outcomes.append((impl.plugin_name, True, result))
        return outcomes

    def _fail(self, plugin: str, hook_name: str, error: BaseException, notices: list[str] | None) -> None:
        """An extension raised during a request: disable it for the session and tell the user."""
        self._failed.add(plugin)
        self._loaders = None
        problem = self._report(plugin, hook_name, error)
        if notices is not None:
            notices.append(problem.describe())

    def _report(self, plugin: str, stage: str, error: BaseException) -> PluginProblem:
        problem = PluginProblem(plugin, stage, one_line(error))
        log.error("%s", problem.describe(), exc_info=error)
        self._problems.append(problem)
        return problem


def _our_version() -> str:
    try:
        return version(OUR_DISTRIBUTION)
    except PackageNotFoundError:
        return ""
