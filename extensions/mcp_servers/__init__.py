"""MCP servers: the tools of Model Context Protocol servers the operator configured, offered in the chat.

The operator (never a chat user) names the servers in a JSON file given with ``--mcp-config FILE``,
in the shape most MCP clients read::

    {"mcpServers": {
        "files": {"command": "npx", "args": ["-y", "@modelcontextprotocol/server-filesystem", "/srv/docs"]},
        "search": {"url": "http://127.0.0.1:8931/mcp", "headers_env": {"Authorization": "SEARCH_TOKEN"}}
    },
     "startup_timeout": 15, "call_timeout": 60}

A ``command`` server is started as a child process and spoken to over its stdin and stdout (the
``env`` given, plus ``PATH``: none of the server's own secrets); a ``url`` server over streamable
HTTP (headers may name environment variables, which are read here and never shown). Each server
is started when the chat first needs tools; one that does not answer within ``startup_timeout``
seconds, exits or fails its handshake is refused with one line in the chat's Tools panel, and
the others still serve. A tool ``t`` of server ``s`` is offered as ``s_t``; a call that takes more
than ``call_timeout`` seconds is abandoned with one line. Everything runs on one event loop thread
of this plugin, closed (and child processes ended) at shutdown.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from loadstar import BadRequestError, Settings, Tool, hookimpl, one_line, problem_line

log = logging.getLogger(__name__)
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


class ServerSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    command: str | None = Field(None, min_length=1, description="Program to start (stdio transport).")
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict, description="Environment of the child (plus PATH).")
    cwd: Path | None = None
    url: str | None = Field(None, pattern=r"^https?://", description="Streamable HTTP endpoint.")
    headers_env: dict[str, str] = Field(default_factory=dict, description="Header -> environment variable.")

    @model_validator(mode="after")
    def _one_transport(self) -> ServerSpec:
        if (self.command is None) == (self.url is None):
            raise ValueError("give either command (stdio) or url (streamable HTTP)")
        return self


class McpConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    servers: dict[str, ServerSpec] = Field(alias="mcpServers", max_length=50)
    startup_timeout: float = Field(15.0, gt=0, le=600)
    call_timeout: float = Field(60.0, gt=0, le=3600)


def read_config(path: Path) -> McpConfig:
    try:
        return McpConfig.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except OSError as error:
        raise BadRequestError(f"--mcp-config {path}: cannot be read: {one_line(error)}") from None
    except ValueError as error:
        message = problem_line(error) if isinstance(error, ValidationError) else f"not JSON: {one_line(error)}"
        raise BadRequestError(f"--mcp-config {path}: {message}") from None


def result_text(result: Any) -> str:
    """An MCP tool result as the text the model reads."""
    parts = []
    for block in result.content:
        kind = getattr(block, "type", "")
        if kind == "text":
            parts.append(block.text)
        elif kind == "resource" and hasattr(block.resource, "text"):
            parts.append(block.resource.text)
        else:
            parts.append(f"[{kind or 'content'} not shown]")
    if not parts and result.structured_content is not None:
        parts.append(json.dumps(result.structured_content, ensure_ascii=False))
    return "\n".join(parts)


class _Connection:
    """One server, served by one task on the plugin's loop: its tools, and a queue of calls."""

    def __init__(self, name: str, spec: ServerSpec) -> None:
        self.name = name
        self.spec = spec
        self.calls: asyncio.Queue[tuple[str, dict[str, Any], asyncio.Future[tuple[bool, str]], float]] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None
        self.tools: list[Any] = []  # what the server listed when it started
        self.closed = False  # a call found the connection closed (the server died): start it again

    def target(self) -> Any:
        from mcp.client.stdio import StdioServerParameters

        if self.spec.url is not None:
            return self.spec.url
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **self.spec.env}
        return StdioServerParameters(command=self.spec.command or "", args=self.spec.args, env=env,
                                     cwd=self.spec.cwd)

    async def serve(self, ready: asyncio.Future[list[Any]]) -> None:
        from mcp import Client

        try:
            async with Client(self._transport()) as client:
                listed = await client.list_tools()
                ready.set_result(list(listed.tools))
                # Each call is a task of its own (requests to one server are independent): a slow
                # call no longer holds up the next, and ends with the group when the server stops.
                async with asyncio.TaskGroup() as calls:
                    while True:
                        tool, arguments, reply, timeout = await self.calls.get()
                        calls.create_task(self._call_one(client, tool, arguments, reply, timeout))
        except Exception as error:
            if not ready.done():
                ready.set_exception(error)
            else:
                log.warning("MCP server %s stopped: %s", self.name, one_line(error))

    async def _call_one(self, client: Any, tool: str, arguments: dict[str, Any],
                        reply: asyncio.Future[tuple[bool, str]], timeout: float) -> None:
        """One call's answer to its caller; never raises (a raise would end every call of the server)."""
        from mcp_types import CONNECTION_CLOSED

        started = time.monotonic()
        try:
            result = await asyncio.wait_for(client.call_tool(tool, arguments), timeout)
            answer = (not result.is_error, result_text(result))
        except TimeoutError:
            answer = (False, f"MCP server {self.name} did not answer within {time.monotonic() - started:.0f} s")
        except Exception as error:  # the server's failure is the model's one-line result
            if getattr(error, "code", None) == CONNECTION_CLOSED:
                self.closed = True
            answer = (False, f"MCP server {self.name}: {one_line(error)}")
        if not reply.done():  # a caller that stopped waiting cancelled it: the late answer is dropped
            reply.set_result(answer)

    def _transport(self) -> Any:
        target = self.target()
        if isinstance(target, str) and self.spec.headers_env:
            import httpx2
            from mcp.client.streamable_http import streamable_http_client

            headers = {header: os.environ.get(var, "") for header, var in self.spec.headers_env.items()}
            return streamable_http_client(target, http_client=httpx2.AsyncClient(headers=headers))
        return target


class McpServers:
    def __init__(self) -> None:
        self.config_path: Path | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._connections: dict[str, _Connection] = {}  # register_tools runs under the ToolBox's lock
        self._startup_timeout = 15.0  # the config's, kept for a restart
        self._restarting = threading.Lock()

    @hookimpl
    def configure(self, settings: Settings) -> None:
        self.config_path = settings.mcp_config

    @hookimpl
    def register_tools(self, register: Callable[[Tool], None], report: Callable[[str], None]) -> None:
        if self.config_path is None:
            return
        try:
            config = read_config(self.config_path)
        except BadRequestError as error:
            report(str(error))
            return
        self._startup_timeout = config.startup_timeout
        # Called again when the enabled plugins change: a server still running is asked nothing
        # and keeps its process; only the ones not running (refused, or stopped) are started.
        for name, spec in config.servers.items():
            running = self._connections.get(name)
            if running is not None and running.task is not None and not running.task.done():
                tools = running.tools
            else:
                try:
                    tools = self._start(name, spec, config.startup_timeout)
                except BadRequestError as error:
                    report(str(error))
                    continue
            for tool in tools:
                self._offer(register, report, name, tool, config.call_timeout)

    def _offer(self, register: Callable[[Tool], None], report: Callable[[str], None], server: str, tool: Any,
               timeout: float) -> None:
        offered = _UNSAFE.sub("_", f"{server}_{tool.name}")[:64]
        schema = dict(tool.input_schema or {})
        schema.setdefault("type", "object")

        def run(arguments: dict[str, Any]) -> str:
            return self._call(server, tool.name, arguments, timeout)

        try:
            register(Tool(offered, (tool.description or f"{tool.name} (MCP server {server})")[:1000], run, schema,
                          timeout=timeout + 5))
        except Exception as error:  # a schema the server got wrong
            report(f"MCP server {server}: tool {tool.name} left out: {one_line(error)}")

    def _start(self, name: str, spec: ServerSpec, timeout: float) -> list[Any]:
        loop = self._ensure_loop()
        connection = _Connection(name, spec)

        async def begin() -> list[Any]:
            ready: asyncio.Future[list[Any]] = loop.create_future()
            connection.task = asyncio.create_task(connection.serve(ready), name=f"mcp-{name}")
            try:
                return await asyncio.wait_for(ready, timeout)
            except BaseException:
                connection.task.cancel()
                await asyncio.gather(connection.task, return_exceptions=True)
                raise

        future = asyncio.run_coroutine_threadsafe(begin(), loop)
        try:
            tools = future.result(timeout + 10)
        except (TimeoutError, FutureTimeout):
            raise BadRequestError(f"MCP server {name} refused: it did not answer within {timeout:g} s") from None
        except Exception as error:
            raise BadRequestError(f"MCP server {name} refused: {_why(error)}") from None
        connection.tools = tools
        self._connections[name] = connection
        return tools

    def _live(self, server: str) -> tuple[_Connection, asyncio.AbstractEventLoop]:
        """The server's connection, started again first if it stopped (it crashed, or a call found
        its connection closed)."""
        with self._restarting:  # two calls that find it stopped start one server, not two
            connection, loop = self._connections.get(server), self._loop
            if connection is None or loop is None or connection.task is None:
                raise BadRequestError(f"MCP server {server} is not running")
            if connection.closed or connection.task.done():
                log.warning("MCP server %s had stopped: starting it again", server)
                loop.call_soon_threadsafe(connection.task.cancel)  # ends the old client and its process
                try:
                    self._start(server, connection.spec, self._startup_timeout)
                except BadRequestError as error:
                    raise BadRequestError(f"MCP server {server} had stopped and did not start again: {error}") from None
                connection = self._connections[server]
            return connection, loop

    def _call(self, server: str, tool: str, arguments: dict[str, Any], timeout: float) -> str:
        started = time.monotonic()
        for attempt in range(2):  # a call that finds the server gone is asked once more, of a new one
            connection, loop = self._live(server)

            async def ask(connection: _Connection = connection, loop: asyncio.AbstractEventLoop = loop) -> tuple[bool, str]:
                reply: asyncio.Future[tuple[bool, str]] = loop.create_future()
                await connection.calls.put((tool, arguments, reply, timeout))
                return await reply

            future: Future[tuple[bool, str]] = asyncio.run_coroutine_threadsafe(ask(), loop)
            try:
                ok, text = future.result(timeout + 2)
            except (TimeoutError, FutureTimeout):
                future.cancel()
                raise BadRequestError(f"MCP server {server} did not answer within {time.monotonic() - started:.0f} s") from None
            if not (connection.closed and attempt == 0):
                break
        if not ok:
            raise BadRequestError(" ".join(text.split())[:500] or f"MCP server {server}: the call failed")
        return text

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=loop.run_forever, name="loadstar-mcp", daemon=True)
            self._thread.start()
            self._loop = loop
        return self._loop

    @hookimpl
    def shutdown(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return

        async def stop_all() -> None:
            tasks = [c.task for c in self._connections.values() if c.task is not None]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(stop_all(), loop).result(15)
        except Exception as error:
            log.warning("MCP servers did not all stop: %s", one_line(error))
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        if not thread.is_alive():
            loop.close()
        self._loop, self._thread, self._connections = None, None, {}


def _why(error: BaseException) -> str:
    """The first real cause of a failed start (anyio wraps them in exception groups)."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    if isinstance(error, FileNotFoundError):
        return f"its command was not found ({error.filename or error})"
    return one_line(error)


def create_plugin() -> McpServers:
    return McpServers()
