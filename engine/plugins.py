"""The plugin host: one typed wrapper around pluggy's manager.

Built-in loaders and third-party plugins arrive the same way, through the ``loadstar``
entry-point group. Loading is guarded per plugin: a plugin that fails to import, registers no
hooks, names an unknown hook or raises inside a hook is recorded in ``problems`` and left out;
everything else keeps working. Callers use the typed methods here, never ``pm.hook.*``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from types import ModuleType
from typing import Any, Callable, Iterable

import pluggy

from engine import hookspecs
from engine.errors import one_line
from engine.loader_api import Loader

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = hookspecs.PROJECT_NAME
OUR_DISTRIBUTION = "loadstar"


@dataclass(frozen=True)
class PluginProblem:
    plugin: str
    stage: str  # "import", "register", or the hook's name
    message: str

    def describe(self) -> str:
        return f"plugin '{self.plugin}' failed at {self.stage}: {self.message}"


@dataclass(frozen=True)
class PluginInfo:
    name: str
    distribution: str  # the package it came from, "loadstar" for built-ins
    version: str
    hooks: tuple[str, ...]

    @property
    def built_in(self) -> bool:
        return self.distribution == OUR_DISTRIBUTION


class PluginHost:
    """Owns one pluggy manager. Tests build a fresh host each; nothing here is global."""

    def __init__(
        self,
        entry_points_: Iterable[EntryPoint] | None = None,
        *,
        third_party: bool = True,
    ) -> None:
        """``entry_points_`` defaults to the installed ``loadstar`` group; ``third_party=False``
        loads only Loadstar's own plugins (the way out of a broken third-party plugin)."""
        self._pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self._pm.add_hookspecs(hookspecs)
        self._entry_points = entry_points_
        self._third_party = third_party
        self._loaded = False
        self._infos: dict[str, PluginInfo] = {}
        self._problems: list[PluginProblem] = []
        self._loaders: dict[str, Loader] | None = None

    # -- discovery -------------------------------------------------------------------------

    def load(self) -> None:
        """Import and register every plugin of the entry-point group, once."""
        if self._loaded:
            return
        self._loaded = True
        eps = self._entry_points if self._entry_points is not None else entry_points(group=ENTRY_POINT_GROUP)
        for ep in sorted(eps, key=lambda e: e.name):
            dist = ep.dist.name if ep.dist is not None else OUR_DISTRIBUTION
            if not self._third_party and dist != OUR_DISTRIBUTION:
                log.info("third-party plugins are off: skipping %s from %s", ep.name, dist)
                continue
            try:
                plugin = ep.load()
            except Exception as error:
                self._report(ep.name, "import", error)
                continue
            version = ep.dist.version if ep.dist is not None else ""
            self.register(plugin, name=ep.name, distribution=dist, version=version)

    def register(self, plugin: ModuleType | object, *, name: str, distribution: str = "", version: str = "") -> bool:
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
        hooks = tuple(sorted(impl.name for impl in self._hookcallers_of(plugin)))
        if not hooks:
            self._pm.unregister(name=name)
            self._problems.append(
                PluginProblem(name, "register", "it implements no hooks (forgotten @hookimpl or wrong project name?)")
            )
            return False
        self._infos[name] = PluginInfo(name, distribution or OUR_DISTRIBUTION, version, hooks)
        self._loaders = None  # recompute on next use
        return True

    @property
    def plugins(self) -> list[PluginInfo]:
        self.load()
        return sorted(self._infos.values(), key=lambda p: p.name)

    @property
    def problems(self) -> list[PluginProblem]:
        self.load()
        return list(self._problems)

    # -- hooks -------------------------------------------------------------------------------

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

    # -- helpers -----------------------------------------------------------------------------

    def _call_each(
        self, hook_name: str, kwargs_for: Callable[[str], dict[str, Any]]
    ) -> list[tuple[str, bool, Any]]:
        """Call each implementation of a hook on its own, so one plugin's error spares the others.

        Returns (plugin name, succeeded, result) per implementation, in pluggy's call order.
        """
        outcomes = []
        caller = getattr(self._pm.hook, hook_name)
        for impl in reversed(caller.get_hookimpls()):  # pluggy's own order: last registered first
            kwargs = kwargs_for(impl.plugin_name)
            try:
                result = impl.function(**{arg: kwargs[arg] for arg in impl.argnames})
            except Exception as error:
                self._report(impl.plugin_name, hook_name, error)
                outcomes.append((impl.plugin_name, False, None))
            else:
                outcomes.append((impl.plugin_name, True, result))
        return outcomes

    def _hookcallers_of(self, plugin: object) -> list[Any]:
        return self._pm.get_hookcallers(plugin) or []

    def _report(self, plugin: str, stage: str, error: BaseException) -> None:
        problem = PluginProblem(plugin, stage, one_line(error))
        log.error("%s", problem.describe(), exc_info=error)
        self._problems.append(problem)
