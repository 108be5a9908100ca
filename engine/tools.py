"""Tools the chat can offer a model: what plugins contribute, and running one call within limits.

Plugins contribute tools through the ``register_tools`` hook (``extensions/example_tools`` gives a
calculator, the time and a file reader; ``extensions/mcp_servers`` gives every tool of the MCP
servers the operator configured). The chat offers them to a model whose chat template takes
tools, shows each call the model makes, and runs it only once the user approves it (or said
"always" for that tool in this conversation).

A call is untrusted input from the model: its arguments must be a JSON object that passes the
tool's JSON schema, it runs at most ``Tool.timeout`` seconds, and its result is cut to
``MAX_RESULT_CHARS``. A tool that raises, hangs or answers nonsense gives the model (and the user)
one line saying so; the chat goes on.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jsonschema

from loadstar.engine.errors import LoadstarError, one_line

MAX_RESULT_CHARS = 20_000
DEFAULT_TIMEOUT = 30.0
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class Tool:
    """One tool a model may call.

    ``parameters`` is a JSON schema of an object (OpenAI's function ``parameters``); ``run(arguments)``
    gets the validated arguments and returns the result as text. It runs on a thread of its own;
    one that outlives ``timeout`` seconds is abandoned (the model is told) and should stop by itself.
    Raise ``LoadstarError`` for a failure the user should read as it is.
    """

    name: str
    description: str
    run: Callable[[dict[str, Any]], str]
    parameters: Mapping[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})
    timeout: float = DEFAULT_TIMEOUT

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"tool name {self.name!r}: use 1-64 letters, digits, _ or -")
        if self.parameters.get("type") != "object":
            raise ValueError(f"tool {self.name}: parameters must be a JSON schema of type object")
        jsonschema.Draft202012Validator.check_schema(dict(self.parameters))

    def spec(self) -> dict[str, Any]:
        """The tool as a request offers it (OpenAI's function tool)."""
        return {"type": "function", "function": {
            "name": self.name, "description": self.description, "parameters": dict(self.parameters)}}


@dataclass(frozen=True)
class ToolResult:
    text: str  # what the model reads (and the chat shows, folded)
    ok: bool
    seconds: float


@dataclass(frozen=True)
class OfferedTool:
    tool: Tool
    plugin: str  # which plugin contributed it


Collected = tuple[list[tuple[str, Tool]], list[str]]  # (plugin, tool) pairs, and one-line problems


class ToolBox:
    """The tools of the enabled plugins, collected once per set of enabled plugins, and their calls.

    It gets the plugin host's methods, not the host (the host's hook specs name ``Tool``):
    ``collect`` calls the ``register_tools`` hook, ``enabled`` names the enabled plugins and
    ``shutdown`` calls the ``shutdown`` hook.
    """

    def __init__(
        self, collect: Callable[[], Collected], enabled: Callable[[], list[str]], shutdown: Callable[[], None],
    ) -> None:
        self._collect_tools = collect
        self._enabled = enabled
        self._shutdown = shutdown
        self._lock = threading.Lock()
        self._key: tuple[str, ...] | None = None
        self._tools: dict[str, OfferedTool] = {}
        self._problems: list[str] = []

    def _collect(self) -> None:
        key = tuple(self._enabled())
        with self._lock:
            if key == self._key:
                return
            offered, problems = self._collect_tools()
            self._tools = {}
            for plugin, tool in offered:
                if tool.name in self._tools:
                    problems.append(f"{plugin}: a tool named {tool.name} is already offered by "
                                    f"{self._tools[tool.name].plugin}: left out")
                    continue
                self._tools[tool.name] = OfferedTool(tool, plugin)
            self._problems = problems
            self._key = key

    def available(self) -> list[OfferedTool]:
        self._collect()
        return list(self._tools.values())

    def problems(self) -> list[str]:
        """One line per tool source that could not be used (an MCP server that did not answer, ...)."""
        self._collect()
        return list(self._problems)

    def specs(self) -> tuple[dict[str, Any], ...]:
        return tuple(offered.tool.spec() for offered in self.available())

    def get(self, name: str) -> Tool | None:
        self._collect()
        offered = self._tools.get(name)
        return offered.tool if offered else None

    def run(self, name: str, arguments: str) -> ToolResult:
        """Run one call; every failure is a one-line result, never an exception."""
        started = time.monotonic()
        tool = self.get(name)
        if tool is None:
            return ToolResult(f"error: there is no tool named {name}", False, 0.0)
        try:
            parsed = json.loads(arguments or "{}")
        except ValueError:
            return ToolResult(f"error: the arguments for {name} are not JSON", False, 0.0)
        if not isinstance(parsed, dict):
            return ToolResult(f"error: the arguments for {name} must be a JSON object", False, 0.0)
        try:
            jsonschema.validate(parsed, dict(tool.parameters))
        except jsonschema.ValidationError as error:
            where = ".".join(str(p) for p in error.absolute_path)
            return ToolResult(f"error: bad arguments for {name}{f' ({where})' if where else ''}: "
                              f"{' '.join(error.message.split())[:300]}", False, 0.0)
        text, ok = _run_with_timeout(tool, parsed)
        if len(text) > MAX_RESULT_CHARS:
            text = text[:MAX_RESULT_CHARS] + f"\n[… cut: the result had {len(text):,} characters]"
        return ToolResult(text, ok, time.monotonic() - started)

    def close(self) -> None:
        self._shutdown()


def _run_with_timeout(tool: Tool, arguments: dict[str, Any]) -> tuple[str, bool]:
    outcome: list[tuple[str, bool]] = []

    def call() -> None:
        try:
            result = tool.run(arguments)
            outcome.append((result if isinstance(result, str) else json.dumps(result, default=str), True))
        except LoadstarError as error:
            outcome.append((f"error: {tool.name}: {error}", False))
        except Exception as error:
            outcome.append((f"error: {tool.name} failed: {one_line(error)[:300]}", False))

    worker = threading.Thread(target=call, name=f"loadstar-tool-{tool.name}", daemon=True)
    worker.start()
    worker.join(tool.timeout)
    if not outcome:
        return f"error: {tool.name} did not finish within {tool.timeout:g} s: stopped waiting for it", False
    return outcome[0]
