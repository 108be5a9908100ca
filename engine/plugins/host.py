"""The plugin host: one typed wrapper around pluggy's manager, calling hooks through pluggy.

Plugins arrive two ways: Loadstar's own extensions from the ``extensions/`` package (one module or
folder each) and every package's plugins through the ``loadstar`` entry-point group (the built-in
loaders come this way too, exactly as third-party ones do). Loading is guarded per plugin: a plugin
that fails to import, registers no hooks, names an unknown hook or uses an old-style
``hookwrapper`` is recorded in ``problems`` and left out; a plugin named in ``disabled``
(``--disable-plugin``) is never imported.

Every hook call goes through ``_invoke`` and so through ``pm.hook``: pluggy's own semantics hold
(call order, ``tryfirst``/``trylast``, ``firstresult``, historic replay of ``configure``,
``wrapper=True`` hooks around the others, hook-call monitoring). Each implementation runs inside
a guard: one that raises is disabled for the rest of the session and the caller is handed a
one-line notice for the user, while the call goes on with the other plugins. Callers use the
typed methods here, one per hook. ``LOADSTAR_TRACE_PLUGINS=1`` logs each hook call: which
plugins it reached, how long it took and what it returned.
"""

from __future__ import annotations

import contextvars
import functools
import importlib
import logging
import os
import pkgutil
import time
from collections.abc import Callable, Collection, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import EntryPoint, PackageNotFoundError, entry_points, version
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pluggy
from pluggy import HookImpl, Result

from loadstar.engine.errors import LoadstarError, one_line
from loadstar.engine.models.loader_api import Loader
from loadstar.engine.plugins import hookspecs

if TYPE_CHECKING:
    from loadstar.engine.chat.characters import Character
    from loadstar.engine.chat.messages import ChatMessage
    from loadstar.engine.chat.prompt_formats import PromptFormat
    from loadstar.engine.generation.requests import GenerationRequest
    from loadstar.engine.models.loader_api import CancelToken, LoadedModel, LoadedModelInfo, StreamPiece
    from loadstar.engine.plugins.extension_api import ReplyDraft, RequestDraft, UIContribution
    from loadstar.engine.settings import Settings
    from loadstar.engine.tools import Tool

log = logging.getLogger(__name__)
trace_log = logging.getLogger("loadstar.plugins.trace")

ENTRY_POINT_GROUP = hookspecs.PROJECT_NAME
OUR_DISTRIBUTION = "loadstar"
EXTENSIONS_PACKAGE = "loadstar.extensions"
TRACE_ENV = "LOADSTAR_TRACE_PLUGINS"
# Built-in extensions that are on until the user turns them off; the others wait to be enabled.
ENABLED_BY_DEFAULT = frozenset({"remote_engine", "example_tools", "mcp_servers"})

# Per hook call (a context variable, so calls on different threads never mix): the plugin whose
# implementation is running, and the problems the call met.
_RUNNING: contextvars.ContextVar[str | None] = contextvars.ContextVar("loadstar_plugin_running", default=None)
_MET: contextvars.ContextVar[list[PluginProblem] | None] = contextvars.ContextVar("loadstar_hook_problems", default=None)


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
        disabled: Collection[str] = (),
        trace: bool | None = None,
    ) -> None:
        """``entry_points_`` defaults to the installed ``loadstar`` group; ``third_party=False``
        loads only Loadstar's own plugins (the way out of a broken third-party plugin).
        ``builtin_extensions`` scans ``extensions/`` (default: when ``entry_points_`` is not given).
        ``enabled`` maps plugin names to on/off, overriding each plugin's default. ``disabled``
        names plugins never to import or register (``--disable-plugin``). ``trace`` logs every
        hook call (default: the ``LOADSTAR_TRACE_PLUGINS`` environment variable)."""
        self._pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self._pm.add_hookspecs(hookspecs)
        self._disabled = frozenset(disabled)
        for name in self._disabled:
            self._pm.set_blocked(name)
        if trace if trace is not None else os.environ.get(TRACE_ENV, "") not in ("", "0"):
            self._pm.add_hookcall_monitoring(_trace_before, _trace_after)
        self._entry_points = entry_points_
        self._third_party = third_party
        self._scan_extensions = entry_points_ is None if builtin_extensions is None else builtin_extensions
        self._choices = dict(enabled or {})
        self._failed: set[str] = set()
        self._loaded = False
        self._infos: dict[str, PluginInfo] = {}
        self._problems: list[PluginProblem] = []
        self._loaders: dict[str, Loader] | None = None
        self._configured = False
        self._objects: dict[str, object] = {}  # the plugins themselves (pluggy holds their stand-ins)
        self._extension_names: set[str] = set()  # every extensions/ module found, loaded or not

    # -- discovery -------------------------------------------------------------------------

    def load(self) -> None:
        """Import and register every plugin, once."""
        if self._loaded:
            return
        self._loaded = True
        if self._scan_extensions:
            self._load_builtin_extensions()
        eps = list(self._entry_points if self._entry_points is not None else entry_points(group=ENTRY_POINT_GROUP))
        seen = {ep.name for ep in eps} | self._extension_names
        for name in sorted(self._disabled - seen):  # a typo in --disable-plugin must not pass silently
            log.warning("--disable-plugin %s: no plugin has that name (known: %s)", name, ", ".join(sorted(seen)))
        for ep in sorted(eps, key=lambda e: e.name):
            dist = ep.dist.name if ep.dist is not None else OUR_DISTRIBUTION
            if not self._third_party and dist != OUR_DISTRIBUTION:
                log.info("third-party plugins are off: skipping %s from %s", ep.name, dist)
                continue
            if ep.name in self._disabled:
                log.info("plugin %s is disabled: not imported", ep.name)
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
            self._extension_names.add(module_info.name)
            if module_info.name.startswith("_") or module_info.name in self._disabled:
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
        """Register one plugin object; False (and a recorded problem) if it is unusable.

        Its implementations are guarded as they are registered; a ``configure`` already called
        is replayed to it by pluggy (historic), and a plugin that raises there is left out."""
        if name in self._disabled:
            return False
        marked = {attr: opts for attr in dir(plugin) if (opts := self._pm.parse_hookimpl_opts(plugin, attr)) is not None}
        hooks = {opts.get("specname") or attr for attr, opts in marked.items()}
        problem = None
        if not marked:
            problem = "it implements no hooks (forgotten @hookimpl or wrong project name?)"
        elif unknown := sorted(hooks - set(self._pm.hook.__dict__)):
            problem = f"unknown hook {', '.join(unknown)} (known: {', '.join(sorted(self._pm.hook.__dict__))})"
        elif old := sorted(attr for attr, opts in marked.items() if opts.get("hookwrapper")):
            problem = (f"{', '.join(old)} uses hookwrapper=True, pluggy's old-style wrapper, which Loadstar does not "
                       "run: write it as @hookimpl(wrapper=True) with 'result = yield', returning the result")
        if problem is not None:
            self._problems.append(PluginProblem(name, "register", problem))
            return False
        # pluggy registers a stand-in whose functions are the plugin's own, each in the guard, so
        # even a historic replay of configure during registration runs guarded.
        stand_in = _StandIn({
            attr: self._guard(name, opts.get("specname") or attr, getattr(plugin, attr), bool(opts.get("wrapper")))
            for attr, opts in marked.items()
        })
        try:
            self._pm.register(stand_in, name=name)
        except Exception as error:  # duplicate name, bad hookimpl signature, a wrapper on a historic hook
            if self._pm.get_plugin(name) is stand_in:
                self._pm.unregister(name=name)
            self._report(name, "register", error)
            return False
        self._objects[name] = plugin
        doc = (getattr(plugin, "__doc__", None) or "").strip().splitlines()
        self._infos[name] = PluginInfo(
            name, distribution or OUR_DISTRIBUTION, version, tuple(sorted(hooks)), kind, doc[0] if doc else ""
        )
        self._loaders = None  # recompute on next use
        return True

    @property
    def plugins(self) -> list[PluginInfo]:
        self.load()
        return sorted(self._infos.values(), key=lambda p: p.name)

    def get(self, name: str) -> object | None:
        """The registered plugin object (a module, or what an extension's create_plugin() made)."""
        self.load()
        return self._objects.get(name)

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

    def enabled_names(self) -> list[str]:
        return [p.name for p in self.plugins if self.is_enabled(p.name)]

    # -- hooks, one typed method each ------------------------------------------------------

    def configure(self, settings: Settings) -> None:
        """Hand the settings to every plugin, once; pluggy replays the call to each plugin that
        registers later (historic), enabled or not, so a plugin switched on later has them too."""
        self.load()
        if self._configured:
            return
        self._configured = True
        self._pm.hook.configure.call_historic(kwargs={"settings": settings})  # failures land in problems

    def loaders(self) -> dict[str, Loader]:
        """Every registered loader by name (the ``register_loaders`` hook), computed once."""
        self.load()
        if self._loaders is None:
            pending: dict[str, dict[str, Loader]] = {}

            def register(loader: Loader) -> None:
                if not isinstance(getattr(loader, "name", None), str) or not loader.name:
                    raise TypeError(f"loader {loader!r} has no name")
                if any(loader.name in registered for registered in pending.values()):
                    raise ValueError(f"a loader named '{loader.name}' is already registered")
                pending.setdefault(_RUNNING.get() or "", {})[loader.name] = loader

            self._invoke("register_loaders", register=register)
            # A plugin that raised half-way registers nothing.
            self._loaders = {
                name: loader for plugin, mine in pending.items() if plugin not in self._failed
                for name, loader in mine.items()
            }
        return dict(self._loaders)

    def modify_request(self, request: RequestDraft, notices: list[str]) -> None:
        self._invoke("modify_request", notices, request=request)

    def render_prompt(
        self, notices: list[str], *, messages: list[ChatMessage], chat_format: PromptFormat,
        special_tokens: Mapping[str, str], model: LoadedModelInfo, add_generation_prompt: bool,
    ) -> str | None:
        """The first extension's prompt for a chat, or None for the engine's own rendering."""
        answer = self._invoke(
            "render_prompt", notices, messages=messages, chat_format=chat_format, special_tokens=special_tokens,
            model=model, add_generation_prompt=add_generation_prompt,
        )
        return answer if isinstance(answer, str) else None

    def generate(
        self, notices: list[str], *, request: GenerationRequest, prompt: str, model: LoadedModel,
        cancel: CancelToken, emit: Callable[[StreamPiece], None], seed: int,
    ) -> bool:
        """True if an extension produced the reply itself."""
        return self._invoke(
            "generate", notices, request=request, prompt=prompt, model=model, cancel=cancel, emit=emit, seed=seed,
        ) is True

    def modify_reply(self, reply: ReplyDraft, notices: list[str]) -> None:
        self._invoke("modify_reply", notices, reply=reply)

    def ui_contributions(self) -> list[tuple[str, UIContribution]]:
        """(plugin name, contribution) for every plugin, enabled or not; the UI shows the enabled ones."""
        found: list[tuple[str, UIContribution]] = []

        def register(contribution: UIContribution) -> None:
            found.append((_RUNNING.get() or "", contribution))

        self._invoke("webui_contribution", include_disabled=True, register=register)
        return [(name, contribution) for name, contribution in found if name not in self._failed]

    def tools(self) -> tuple[list[tuple[str, Tool]], list[str]]:
        """(plugin name, tool) for every enabled plugin's tools, and the one-line problems they reported."""
        found: list[tuple[str, Tool]] = []
        problems: list[str] = []

        def register(tool: Tool) -> None:
            found.append((_RUNNING.get() or "", tool))

        def report(line: str) -> None:
            problems.append(" ".join(str(line).split())[:300])

        self._invoke("register_tools", problems, register=register, report=report)
        return [(name, tool) for name, tool in found if name not in self._failed], problems

    def characters(self) -> list[tuple[str, Character]]:
        """(plugin name, character) for every enabled plugin's characters."""
        found: list[tuple[str, Character]] = []

        def register(character: Character) -> None:
            found.append((_RUNNING.get() or "", character))

        self._invoke("register_characters", register=register)
        return [(name, character) for name, character in found if name not in self._failed]

    def shutdown(self) -> None:
        if self._loaded:
            self._invoke("shutdown", include_disabled=True)

    # -- the one way a hook is called ----------------------------------------------------------

    def _invoke(
        self, hook_name: str, notices: list[str] | None = None, *, include_disabled: bool = False, **kwargs: Any,
    ) -> Any:
        """Call ``hook_name`` through pluggy on the enabled plugins (all of them with
        ``include_disabled``); a plugin that raises is disabled, and ``notices`` get a line
        saying so. A ``LoadstarError`` (a one-line error about this request) goes to the caller."""
        self.load()
        off = [] if include_disabled else [
            plugin for name, plugin in self._pm.list_name_plugin() if plugin is not None and not self.is_enabled(name)
        ]
        caller = self._pm.subset_hook_caller(hook_name, off) if off else getattr(self._pm.hook, hook_name)
        problems: list[PluginProblem] = []
        token = _MET.set(problems)
        try:
            return caller(**kwargs)
        finally:
            _MET.reset(token)
            if notices is not None:
                notices.extend(problem.describe() for problem in problems)

    def _guard(self, plugin: str, hook_name: str, function: Callable[..., Any], wrapper: bool) -> Callable[..., Any]:
        """``function`` that, when it raises, disables ``plugin`` and lets the call go on."""
        if wrapper:
            return functools.wraps(function)(self._guarded_wrapper(plugin, hook_name, function))

        @functools.wraps(function)
        def guarded(*args: Any) -> Any:
            running = _RUNNING.set(plugin)
            try:
                return function(*args)
            except LoadstarError:
                raise
            except Exception as error:
                self._fail(plugin, hook_name, error)
                return None  # pluggy goes on to the next implementation (firstresult: no answer)
            finally:
                _RUNNING.reset(running)

        return guarded

    def _guarded_wrapper(
        self, plugin: str, hook_name: str, function: Callable[..., Generator[None, Any, Any]]
    ) -> Callable[..., Generator[None, Any, Any]]:
        """A ``wrapper=True`` implementation, guarded: a wrapper that raises before its ``yield``
        is skipped, one that raises after it leaves the inner result as it was."""

        def guarded(*args: Any) -> Generator[None, Any, Any]:
            running = _RUNNING.set(plugin)
            try:
                gen = function(*args)
                next(gen)
            except LoadstarError:
                raise
            except Exception as error:  # StopIteration included: a wrapper must yield once
                self._fail(plugin, hook_name, error)
                return (yield)
            finally:
                _RUNNING.reset(running)
            try:
                result = yield
            except BaseException as inner:  # the inner implementations raised: the wrapper sees it
                try:
                    gen.throw(inner)
                except StopIteration as stop:
                    return stop.value
                raise
            try:
                gen.send(result)
            except StopIteration as stop:
                return stop.value
            except LoadstarError:
                raise
            except Exception as error:
                self._fail(plugin, hook_name, error)
                return result
            self._fail(plugin, hook_name, RuntimeError("the wrapper yielded more than once"))
            return result

        return guarded

    def _fail(self, plugin: str, hook_name: str, error: BaseException) -> None:
        """An implementation raised: disable its plugin for the session and tell the call."""
        self._failed.add(plugin)
        self._loaders = None
        problem = self._report(plugin, hook_name, error)
        met = _MET.get()
        if met is not None:
            met.append(problem)

    def _report(self, plugin: str, stage: str, error: BaseException) -> PluginProblem:
        problem = PluginProblem(plugin, stage, one_line(error))
        log.error("%s", problem.describe(), exc_info=error)
        self._problems.append(problem)
        return problem


class _StandIn:
    """What pluggy registers for a plugin: the plugin's hook functions, each in the guard."""

    def __init__(self, functions: Mapping[str, Callable[..., Any]]) -> None:
        self.__dict__.update(functions)


_TRACE_STARTS: contextvars.ContextVar[tuple[float, ...]] = contextvars.ContextVar("loadstar_trace", default=())


def _trace_before(hook_name: str, impls: Sequence[HookImpl], kwargs: Mapping[str, Any]) -> None:
    reached = ", ".join(impl.plugin_name for impl in reversed(impls)) or "no plugin"  # pluggy calls the last first
    trace_log.info("hook %s -> %s (%s)", hook_name, reached, ", ".join(sorted(kwargs)))
    _TRACE_STARTS.set((*_TRACE_STARTS.get(), time.perf_counter()))


def _trace_after(outcome: Result[Any], hook_name: str, impls: Sequence[HookImpl], kwargs: Mapping[str, Any]) -> None:
    starts = _TRACE_STARTS.get()
    took = (time.perf_counter() - starts[-1]) * 1000 if starts else 0.0
    _TRACE_STARTS.set(starts[:-1])
    error = outcome.exception
    shown = f"raised {one_line(error)}" if error is not None else f"returned {_short(outcome.get_result())}"
    trace_log.info("hook %s <- %s in %.1f ms", hook_name, shown, took)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _our_version() -> str:
    try:
        return version(OUR_DISTRIBUTION)
    except PackageNotFoundError:
        return ""
