"""Tool calls: the tools a request offers, whether a chat template takes them, and finding the calls in a reply.

The engine renders tools into the prompt through the model's own chat template (as transformers'
``apply_chat_template(tools=...)`` does); a template that never reads ``tools`` cannot offer them,
and such a request is refused with a reason rather than the tools silently dropped.

Models write calls in their own way. ``find_calls`` reads the common ones:
- ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (Hermes, Qwen 2.5/3, SmolLM3), any number;
- ``[TOOL_CALLS] [{"name": ..., "arguments": {...}}]`` (Mistral);
- ``<|python_tag|>`` then JSON, or a reply that is nothing but a call as JSON (Llama 3.1/3.2:
  ``{"name": ..., "parameters": {...}}``), one call or a list of them.
Only names of offered tools count; anything else stays text.

With ``tool_choice`` "required" or a named function, a model that can constrain its output
(FEATURE_GRAMMAR) is held to ``call_schema``: one call as JSON, to one of the offered functions.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from loadstar.engine.chat.json_reply import check_schema, unfenced
from loadstar.engine.errors import BadRequestError

ToolMode = Literal["auto", "required", "none"]

_TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)
_MARKERS = ("[TOOL_CALLS]", "<|python_tag|>")


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as OpenAI clients expect it

    @staticmethod
    def new(name: str, arguments: Mapping[str, Any]) -> ToolCall:
        return ToolCall("call_" + secrets.token_hex(12), name, json.dumps(arguments, ensure_ascii=False))

    def as_template_dict(self) -> dict[str, Any]:
        """The shape chat templates read (transformers' convention: arguments as an object)."""
        try:
            arguments = json.loads(self.arguments)
        except ValueError:
            arguments = self.arguments
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": arguments}}


@dataclass(frozen=True)
class ToolUse:
    """The tools a request offers (OpenAI's function tools) and how the model may use them:
    ``auto`` (it decides), ``required`` (it must call one), ``none``; ``name`` forces that function."""

    tools: tuple[Mapping[str, Any], ...] = ()
    mode: ToolMode = "auto"
    name: str | None = None

    def __post_init__(self) -> None:
        names = self.names
        if len(set(names)) != len(names):
            raise BadRequestError("two tools have the same name")
        for tool in self.tools:
            check_schema(tool["function"].get("parameters") or {"type": "object"})
        if self.name is not None and self.name not in names:
            raise BadRequestError(f"tool_choice names '{self.name}', which is not among the tools")
        if self.mode == "required" and not self.tools:
            raise BadRequestError("tool_choice 'required' needs tools")

    @property
    def names(self) -> list[str]:
        return [tool["function"]["name"] for tool in self.tools]

    @property
    def active(self) -> bool:
        """Whether the prompt offers tools and the reply is read for calls."""
        return bool(self.tools) and self.mode != "none"

    @property
    def must_call(self) -> bool:
        return self.active and (self.mode == "required" or self.name is not None)

    def call_schema(self) -> dict[str, Any]:
        """One call to an offered function (the forced one, if named), as JSON."""
        options = []
        for tool in self.tools:
            function = tool["function"]
            if self.name is not None and function["name"] != self.name:
                continue
            options.append({
                "type": "object",
                "properties": {"name": {"const": function["name"]},
                               "arguments": function.get("parameters") or {"type": "object"}},
                "required": ["name", "arguments"],
            })
        return options[0] if len(options) == 1 else {"anyOf": options}


def template_takes_tools(template: str) -> bool:
    """Whether a chat template reads the ``tools`` variable (so tools offered reach the prompt)."""
    import jinja2
    from jinja2 import meta

    try:
        return "tools" in meta.find_undeclared_variables(jinja2.Environment().parse(template))
    except jinja2.TemplateError:
        return False


def find_calls(text: str, names: Sequence[str]) -> tuple[str, tuple[ToolCall, ...]]:
    """The reply's text without its calls, and the calls to offered functions it makes."""
    allowed = set(names)
    calls: list[ToolCall] = []
    if "<tool_call>" in text:
        rest = text
        for match in _TAGGED.finditer(text):
            found = _calls_in(match.group(1), allowed)
            if found:
                calls.extend(found)
                rest = rest.replace(match.group(0), "", 1)
        return (rest.strip(), tuple(calls)) if calls else (text, ())
    for marker in _MARKERS:
        if marker in text:
            before, _, after = text.partition(marker)
            found = _calls_in(after, allowed)
            if found:
                return before.strip(), tuple(found)
    found = _calls_in(text, allowed)
    return ("", tuple(found)) if found else (text, ())


class CallWatch:
    """What of a streamed reply can be shown while tools are offered: text that cannot be part of
    a call ``find_calls`` would read. A reply that begins like JSON (``{``, ``[``) or a code fence
    may be a call as a whole and is held to its end; other text is shown up to the first call
    marker (``<tool_call>``, ``[TOOL_CALLS]``, ``<|python_tag|>``) and held from there, and a tail
    that may be a marker's beginning waits for the next piece."""

    def __init__(self) -> None:
        self.text = ""
        self.shown = 0  # characters of ``text`` already shown
        self.holding = False

    def add(self, piece: str) -> str:
        """Take the next piece of the reply; return what can be shown now."""
        self.text += piece
        if self.holding:
            return ""
        begins = self.text.lstrip()
        if not begins or begins.startswith(("{", "[", "`")):
            self.holding = bool(begins)  # nothing but space yet: wait and see
            return ""
        cut = len(self.text)
        for marker in ("<tool_call>", *_MARKERS):
            at = self.text.find(marker)
            if at >= 0:
                cut, self.holding = min(cut, at), True
            else:
                cut = min(cut, len(self.text) - _open_prefix(self.text, marker))
        out = self.text[self.shown:cut] if cut > self.shown else ""
        self.shown = max(self.shown, cut)
        return out

    def rest(self, final: str) -> str:
        """What to send at the end, when the reply's text besides its calls is ``final``: what
        was not shown yet (nothing, when an extension changed what was already shown)."""
        said = self.text[: self.shown]
        for prefix in (said, said.strip()):  # the text besides the calls comes back stripped
            if final.startswith(prefix):
                return final[len(prefix):]
        return ""


def _open_prefix(text: str, marker: str) -> int:
    """The length of the longest beginning of ``marker`` that ``text`` ends with."""
    return next((n for n in range(min(len(marker) - 1, len(text)), 0, -1) if text.endswith(marker[:n])), 0)


def _calls_in(text: str, allowed: set[str]) -> list[ToolCall]:
    candidate = unfenced(text)
    if not candidate.startswith(("{", "[")):
        return []
    try:
        value = json.loads(candidate)
    except ValueError:
        return []
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict):
            return []
        inner = item.get("function")
        function: dict[str, Any] = inner if isinstance(inner, dict) else item
        name = function.get("name")
        arguments = function.get("arguments", function.get("parameters", {}))
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return []
        if name not in allowed or not isinstance(arguments, dict):
            return []
        calls.append(ToolCall.new(name, arguments))
    return calls
