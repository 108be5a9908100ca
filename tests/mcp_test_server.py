"""A real MCP server for the tests, spoken to over stdio (the mcp SDK's MCPServer).

    python tests/mcp_test_server.py              serves the tools below
    python tests/mcp_test_server.py --only NAME  serves only that tool
    python tests/mcp_test_server.py --hang       starts but never answers (a server that hangs)
    python tests/mcp_test_server.py --http PORT  serves over streamable HTTP at http://127.0.0.1:PORT/mcp
"""

from __future__ import annotations

import sys
import time


def warehouse_stock(item: str) -> str:
    """How many of an item the warehouse holds."""
    stock = {"widgets": 73, "gadgets": 5}
    return f"The warehouse holds {stock.get(item.lower(), 0)} {item}."


def todays_special() -> str:
    """Today's special dish at the restaurant."""
    return "Today's special is mushroom risotto."


def slow_echo(text: str, seconds: float = 30.0) -> str:
    """Echo the text after a pause (a tool that takes too long)."""
    time.sleep(seconds)
    return text


def broken(reason: str = "boom") -> str:
    """Always fails, saying why."""
    from mcp.server.mcpserver.exceptions import ToolError

    raise ToolError(reason)


def main() -> None:
    if "--hang" in sys.argv:
        time.sleep(3600)  # reads nothing and answers nothing, as a stuck server does
        return
    from mcp.server.mcpserver import MCPServer

    server = MCPServer("loadstar-test")
    only = sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else None
    for tool in (warehouse_stock, todays_special, slow_echo, broken):
        if only in (None, tool.__name__):
            server.tool()(tool)
    if "--http" in sys.argv:
        server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[sys.argv.index("--http") + 1]))
    else:
        server.run()


if __name__ == "__main__":
    main()
