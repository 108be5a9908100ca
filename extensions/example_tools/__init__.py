"""Example tools: a calculator, the current time and a file reader, so tools in the chat work offline.

On by default; the chat offers them only when the user ticks "Let the model call tools", and every
call waits for the user's approval unless they chose "Always run this tool".

- ``calculator``: arithmetic on numbers (``+ - * / // % **``, parentheses, ``sqrt``, ``sin`` ...),
  evaluated by walking Python's syntax tree: no names, calls or attributes beyond the listed
  functions, and no huge powers, so a model cannot run code or hang the server through it.
- ``current_time``: the date and time now, in UTC or a named time zone (``Europe/Paris``).
- ``read_file``: a text file inside the folder the operator chose with ``--tools-folder DIR``;
  without that flag the tool is not offered. Paths are resolved and must stay inside the folder
  (no ``..``, no symlinks out of it); at most 100 KB are read.
"""

from __future__ import annotations

import ast
import datetime as dt
import math
import operator
from pathlib import Path
from typing import Any

from loadstar import BadRequestError, Settings, Tool, hookimpl

MAX_READ_BYTES = 100_000
MAX_EXPRESSION = 500
MAX_POWER = 10_000  # the largest exponent (and result digits stay small enough to print)

_OPERATORS: dict[type, Any] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_UNARY: dict[type, Any] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS: dict[str, Any] = {
    name: getattr(math, name) for name in
    ("sqrt", "sin", "cos", "tan", "asin", "acos", "atan", "log", "log10", "log2", "exp", "floor", "ceil", "factorial")
} | {"abs": abs, "round": round, "min": min, "max": max}
_CONSTANTS = {"pi": math.pi, "e": math.e, "tau": math.tau}


def calculate(expression: str) -> float | int:
    """The value of an arithmetic expression, or a ``BadRequestError`` saying what is not allowed."""
    if len(expression) > MAX_EXPRESSION:
        raise BadRequestError(f"the expression is longer than {MAX_EXPRESSION} characters")
    try:
        tree = ast.parse(expression.replace("^", "**").replace("×", "*").replace("÷", "/"), mode="eval")
    except SyntaxError:
        raise BadRequestError(f"not an arithmetic expression: {expression!r}") from None
    try:
        return _value(tree.body)
    except ZeroDivisionError:
        raise BadRequestError("division by zero") from None
    except (OverflowError, ValueError) as error:
        raise BadRequestError(f"cannot compute that: {error}") from None


def _value(node: ast.AST) -> Any:
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.Name) and node.id in _CONSTANTS:
        return _CONSTANTS[node.id]
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _value(node.left), _value(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_POWER:
            raise BadRequestError(f"exponents above {MAX_POWER} are not computed")
        return _OPERATORS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_value(node.operand))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS and not node.keywords:
        arguments = [_value(a) for a in node.args]
        if node.func.id == "factorial" and arguments and arguments[0] > 1000:
            raise BadRequestError("factorials above 1000! are not computed")
        return _FUNCTIONS[node.func.id](*arguments)
    raise BadRequestError(f"not allowed in a calculation: {ast.unparse(node)[:60]}")


def current_time(zone: str | None) -> str:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        tz = ZoneInfo(zone) if zone and zone.upper() != "UTC" else dt.UTC
    except (ZoneInfoNotFoundError, ValueError):
        raise BadRequestError(f"unknown time zone {zone!r} (use a name such as Europe/Paris)") from None
    now = dt.datetime.now(tz)
    return now.strftime("%A %d %B %Y, %H:%M:%S ") + (now.tzname() or "UTC")


def read_inside(folder: Path, relative: str) -> str:
    """The text of ``relative`` inside ``folder``; a path that leaves it is refused."""
    root = folder.resolve()
    try:
        path = (root / relative).resolve(strict=True)
    except (OSError, RuntimeError):
        raise BadRequestError(f"no file {relative!r} in the tools folder") from None
    if root not in path.parents or not path.is_file():
        raise BadRequestError(f"{relative!r} is not a file inside the tools folder")
    data = path.open("rb").read(MAX_READ_BYTES + 1)
    if b"\x00" in data[:8192]:
        raise BadRequestError(f"{relative!r} is a binary file")
    text = data[:MAX_READ_BYTES].decode("utf-8", errors="replace")
    return text + (f"\n[… cut at {MAX_READ_BYTES:,} bytes]" if len(data) > MAX_READ_BYTES else "")


class ExampleTools:
    def __init__(self) -> None:
        self.folder: Path | None = None

    @hookimpl
    def configure(self, settings: Settings) -> None:
        self.folder = settings.tools_folder

    @hookimpl
    def register_tools(self, register: Any) -> None:
        register(Tool(
            "calculator", "Compute an arithmetic expression exactly, e.g. (17 * 23) + sqrt(2).",
            lambda args: str(calculate(args["expression"])),
            {"type": "object", "properties": {"expression": {"type": "string", "description": "e.g. 12 * (3 + 4)"}},
             "required": ["expression"], "additionalProperties": False},
            timeout=5,
        ))
        register(Tool(
            "current_time", "The current date and time, in UTC or in a time zone such as Europe/Paris.",
            lambda args: current_time(args.get("zone")),
            {"type": "object", "properties": {"zone": {"type": "string", "description": "IANA time zone name"}},
             "additionalProperties": False},
            timeout=5,
        ))
        folder = self.folder
        if folder is not None:
            register(Tool(
                "read_file", "Read a text file from the user's shared folder, by its path inside that folder.",
                lambda args: read_inside(folder, args["path"]),
                {"type": "object", "properties": {"path": {"type": "string", "description": "e.g. notes/todo.txt"}},
                 "required": ["path"], "additionalProperties": False},
                timeout=10,
            ))


def create_plugin() -> ExampleTools:
    return ExampleTools()
