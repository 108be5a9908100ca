"""Tools in the chat: the example tools, the limits every call runs under, and real MCP servers
(tests/mcp_test_server.py, over stdio) through the mcp_servers extension."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from loadstar import BadRequestError, Settings, Tool, hookimpl
from loadstar.engine.plugins.host import PluginHost
from loadstar.engine.tools import MAX_RESULT_CHARS, ToolBox
from loadstar.extensions.example_tools import calculate, read_inside
from loadstar.extensions.mcp_servers import McpServers
from tests.helpers import still_there

SERVER = str(Path(__file__).with_name("mcp_test_server.py"))


def test_the_calculator_computes_and_refuses_code():
    assert calculate("(17 * 23) + sqrt(16)") == 395.0
    assert calculate("2^10") == 1024
    for bad, why in [("__import__('os').system('id')", "not allowed"), ("9**9**9", "exponents above"),
                     ("1/0", "division by zero"), ("open('x')", "not allowed"), ("2 +", "not an arithmetic")]:
        with pytest.raises(BadRequestError, match=why):
            calculate(bad)


def test_read_file_stays_inside_its_folder(tmp_path):
    folder = tmp_path / "shared"
    (folder / "notes").mkdir(parents=True)
    (folder / "notes" / "todo.txt").write_text("buy milk")
    (tmp_path / "secret.txt").write_text("password")
    (folder / "link.txt").symlink_to(tmp_path / "secret.txt")
    assert read_inside(folder, "notes/todo.txt") == "buy milk"
    for escape in ("../secret.txt", "/etc/passwd", "link.txt", "notes"):
        with pytest.raises(BadRequestError):
            read_inside(folder, escape)


class Tools:
    @hookimpl
    def register_tools(self, register):
        register(Tool("add", "Add two numbers.", lambda a: str(a["x"] + a["y"]),
                      {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
                       "required": ["x", "y"]}))
        register(Tool("hang", "Never ends.", lambda a: time.sleep(30) or "late", timeout=0.5))
        register(Tool("crash", "Raises.", lambda a: 1 / 0))
        register(Tool("flood", "Too much.", lambda a: "x" * (MAX_RESULT_CHARS * 3)))


def toolbox(*plugins: object) -> ToolBox:
    host = PluginHost([], builtin_extensions=False)
    for i, plugin in enumerate(plugins):
        host.register(plugin, name=f"p{i}")
    return ToolBox(host.tools, host.enabled_names, host.shutdown)


def test_a_call_runs_with_checked_arguments_and_every_failure_is_one_line():
    box = toolbox(Tools())
    assert [o.tool.name for o in box.available()] == ["add", "hang", "crash", "flood"]
    assert box.run("add", '{"x": 2, "y": 3}').text == "5"
    cases = {
        ("add", '{"x": 2}'): "error: bad arguments for add: 'y' is a required property",
        ("add", "not json"): "error: the arguments for add are not JSON",
        ("add", "[1, 2]"): "error: the arguments for add must be a JSON object",
        ("nope", "{}"): "error: there is no tool named nope",
        ("crash", "{}"): "error: crash failed: ZeroDivisionError: division by zero",
        ("hang", "{}"): "error: hang did not finish within 0.5 s",
    }
    for (name, arguments), expected in cases.items():
        result = box.run(name, arguments)
        assert not result.ok and result.text.startswith(expected) and "\n" not in result.text, result
    flood = box.run("flood", "{}")
    assert len(flood.text) < MAX_RESULT_CHARS + 100 and flood.text.endswith("characters]")


def test_a_tool_with_a_bad_name_or_schema_is_refused():
    with pytest.raises(ValueError, match="tool name"):
        Tool("no spaces", "", lambda a: "")
    with pytest.raises(ValueError, match="type object"):
        Tool("fine", "", lambda a: "", {"type": "string"})


def mcp_servers(tmp_path, servers: dict, **extra) -> McpServers:
    config = tmp_path / "mcp.json"
    config.write_text(json.dumps({"mcpServers": servers, **extra}))
    plugin = McpServers()
    plugin.configure(Settings(mcp_config=config, data_dir=tmp_path / "data"))
    return plugin


def mcp_children() -> list[int]:
    """The pids of this process's MCP test servers (tests/mcp_test_server.py)."""
    import psutil

    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            if "mcp_test_server" in " ".join(process.cmdline()):
                found.append(process.pid)
        except psutil.NoSuchProcess:
            pass
    return found


def stdio(*args: str) -> dict:
    return {"command": sys.executable, "args": [SERVER, *args]}


def test_an_mcp_server_over_stdio_offers_its_tools_and_answers_calls(tmp_path):
    plugin = mcp_servers(tmp_path, {"store": stdio()}, call_timeout=3)
    box = toolbox(plugin)
    try:
        names = [o.tool.name for o in box.available()]
        assert names == ["store_warehouse_stock", "store_todays_special", "store_slow_echo", "store_broken"]
        assert box.problems() == []
        assert box.run("store_warehouse_stock", '{"item": "widgets"}').text == "The warehouse holds 73 widgets."
        broken = box.run("store_broken", '{"reason": "disk on fire"}')
        assert not broken.ok and broken.text == "error: store_broken: Error executing tool broken: disk on fire", broken
        started = time.monotonic()
        slow = box.run("store_slow_echo", '{"text": "hi", "seconds": 30}')
        assert slow.text == "error: store_slow_echo: MCP server store did not answer within 3 s", slow
        assert time.monotonic() - started < 15
        # The server still answers after a call it was too slow for.
        assert "5 gadgets" in box.run("store_warehouse_stock", '{"item": "gadgets"}').text
        # Collected again (the enabled plugins changed): the same server serves, none is started anew.
        connection = plugin._connections["store"]
        box._key = None
        assert [o.tool.name for o in box.available()] == names
        assert plugin._connections["store"] is connection
        assert "73 widgets" in box.run("store_warehouse_stock", '{"item": "widgets"}').text
        [child] = mcp_children()  # the one server process, started once
    finally:
        box.close()
    assert still_there(child, timeout=15) is None  # shut down: the server's process ended and was reaped
    assert mcp_children() == []


def test_a_hanging_or_missing_mcp_server_is_refused_in_one_line_and_the_others_serve(tmp_path):
    plugin = mcp_servers(tmp_path, {"stuck": stdio("--hang"), "ghost": {"command": "/nonexistent/mcp-server"},
                                    "store": stdio()}, startup_timeout=3)
    box = toolbox(plugin)
    try:
        started = time.monotonic()
        names = [o.tool.name for o in box.available()]
        assert time.monotonic() - started < 40
        assert "store_warehouse_stock" in names and not any(n.startswith(("stuck", "ghost")) for n in names)
        problems = box.problems()
        assert "MCP server stuck refused: it did not answer within 3 s" in problems
        [ghost] = [p for p in problems if p.startswith("MCP server ghost refused")]
        assert all("\n" not in p for p in problems)
        assert "not found" in ghost or "No such file" in ghost, ghost
    finally:
        box.close()


def test_a_bad_mcp_config_is_one_line(tmp_path):
    plugin = mcp_servers(tmp_path, {"both": {"command": "x", "url": "http://127.0.0.1:1/mcp"}})
    box = toolbox(plugin)
    [problem] = box.problems()
    assert problem.startswith("--mcp-config") and "either command" in problem
    box.close()


def test_an_mcp_server_over_streamable_http_answers_calls(tmp_path):
    import socket
    import subprocess

    from tests.helpers import free_port

    port = free_port()
    process = subprocess.Popen([sys.executable, SERVER, "--http", str(port)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:  # until it listens
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and process.poll() is None, "the HTTP MCP server did not start"
                time.sleep(0.2)
        plugin = mcp_servers(tmp_path, {"remote": {"url": f"http://127.0.0.1:{port}/mcp"}})
        box = toolbox(plugin)
        try:
            assert "remote_todays_special" in [o.tool.name for o in box.available()], box.problems()
            assert box.run("remote_todays_special", "{}").text == "Today's special is mushroom risotto."
        finally:
            box.close()
    finally:
        process.terminate()
        process.wait(10)


def test_slow_calls_leave_the_server_serving_and_a_dead_server_starts_again_on_the_next_call(tmp_path):
    """Calls were answered one at a time: four slow ones at once left the last callers waiting past
    their deadline, their late answers went to cancelled callers and raised, and every later call
    answered "MCP server store is not running"."""
    import os
    import signal

    from tests.helpers import run_concurrently

    plugin = mcp_servers(tmp_path, {"store": stdio()}, call_timeout=2)
    box = toolbox(plugin)
    try:
        assert box.problems() == []
        slow = '{"text": "hi", "seconds": 6}'
        timed_out = run_concurrently(lambda _: box.run("store_slow_echo", slow).text, range(4), timeout=60)
        assert set(timed_out.values()) == {"error: store_slow_echo: MCP server store did not answer within 2 s"}, timed_out
        time.sleep(5)  # the server's late answers come now, for callers that are gone
        assert "5 gadgets" in box.run("store_warehouse_stock", '{"item": "gadgets"}').text

        def beside(_):  # a quick call while a slow one runs is answered at once
            if _ == "slow":
                return box.run("store_slow_echo", slow).text
            time.sleep(0.3)
            started = time.monotonic()
            return box.run("store_warehouse_stock", '{"item": "widgets"}').text, time.monotonic() - started

        both = run_concurrently(beside, ["slow", "quick"], timeout=60)
        text, took = both["quick"]
        assert "73 widgets" in text and took < 1.0, both

        [child] = mcp_children()
        os.kill(child, signal.SIGKILL)  # the server dies
        assert still_there(child, timeout=15) is None
        again = box.run("store_warehouse_stock", '{"item": "widgets"}')  # started again for this call
        assert "73 widgets" in again.text, again
        assert len(mcp_children()) == 1 and mcp_children() != [child]
    finally:
        box.close()
    assert mcp_children() == []
