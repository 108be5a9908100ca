"""JSON replies: the schema a request gives (checked as untrusted input) and the reply checked against it.

A model that can constrain its sampling (FEATURE_GRAMMAR) writes only JSON that fits the schema;
any other model is asked the same and its reply is validated here. Either way a reply that is not
valid JSON for the schema ends as an error with a one-line reason, never as text the client's
``json.loads`` trips on. A reply wrapped in a Markdown code fence (what unconstrained models often
write) is unwrapped, and so is a reply whose one fenced block is JSON among prose ("```json {...}```
This cat is ..."): the client asked for the JSON, and the prose around it is dropped.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from loadstar.engine.errors import BadRequestError

MAX_SCHEMA_BYTES = 64_000
MAX_SCHEMA_DEPTH = 32
ANY_OBJECT: Mapping[str, Any] = {"type": "object"}

_FENCE = re.compile(r"^\s*```[A-Za-z0-9_-]*\s*\n(.*?)\n?```\s*$", re.S)
_BLOCK = re.compile(r"^[ \t]*```[A-Za-z0-9_-]*[ \t]*\n(.*?)\n[ \t]*```[ \t]*$", re.S | re.M)


def check_schema(schema: Any) -> dict[str, Any]:
    """``schema`` if it is a JSON schema this server takes: an object, at most 64 kB as JSON, at
    most 32 levels deep, valid against its metaschema. Raises BadRequestError with the reason."""
    if not isinstance(schema, Mapping):
        raise BadRequestError("the JSON schema must be an object")
    try:
        size = len(json.dumps(schema))
    except (TypeError, ValueError, RecursionError):
        raise BadRequestError("the JSON schema is not plain JSON") from None
    if size > MAX_SCHEMA_BYTES:
        raise BadRequestError(f"the JSON schema is too large ({size:,} bytes; at most {MAX_SCHEMA_BYTES:,})")
    if _depth(schema) > MAX_SCHEMA_DEPTH:
        raise BadRequestError(f"the JSON schema is nested more than {MAX_SCHEMA_DEPTH} levels deep")
    from jsonschema import exceptions, validators

    try:
        validators.validator_for(schema).check_schema(dict(schema))
    except exceptions.SchemaError as error:
        raise BadRequestError(f"the JSON schema is not valid: {error.message}") from None
    contradiction = _contradiction(schema)
    if contradiction:
        # A grammar cannot hold bounds like these: the model would write JSON the schema then
        # refuses, and the request would fail as if the server had (a 500 before).
        raise BadRequestError(f"the JSON schema allows no value: {contradiction}")
    return dict(schema)


_BOUNDS = (("minLength", "maxLength"), ("minimum", "maximum"), ("minItems", "maxItems"),
           ("minProperties", "maxProperties"), ("exclusiveMinimum", "maximum"), ("minimum", "exclusiveMaximum"))


def _contradiction(schema: Mapping[str, Any]) -> str | None:
    """Where the parts every valid value must satisfy (the root, ``allOf``, required properties,
    the items of an array that must have some) contradict themselves, in words; None if nowhere."""
    stack: list[tuple[Any, str]] = [(schema, "the top level")]
    while stack:
        node, where = stack.pop()
        if node is False:
            return f"false at {where}"
        if not isinstance(node, Mapping):
            continue
        for low, high in _BOUNDS:
            a, b = node.get(low), node.get(high)
            if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool) and (
                    a > b or (a == b and "exclusive" in low + high)):
                return f"{low} {a} with {high} {b} at {where}"
        if node.get("enum") == []:
            return f"an empty enum at {where}"
        if node.get("not") in ({}, True):
            return f"'not' of everything at {where}"
        named = [node.get("type"), *(part.get("type") for part in node.get("allOf") or () if isinstance(part, Mapping))]
        types = [set(t) if isinstance(t, list) else {t} for t in named if isinstance(t, str | list)]
        types = [t | {"integer"} if "number" in t else t for t in types]  # an integer is a number too
        if types and not set.intersection(*types):
            return f"types {' and '.join(sorted('/'.join(sorted(t)) for t in types))} together at {where}"
        properties: Mapping[str, Any] = node["properties"] if isinstance(node.get("properties"), Mapping) else {}
        for name in node.get("required") or ():
            if name not in properties and node.get("additionalProperties") is False:
                return f"'{name}' is required but no property may be added at {where}"
            if name in properties:
                stack.append((properties[name], f"'{name}' in {where}"))
        stack.extend((part, where) for part in node.get("allOf") or ())
        items, least = node.get("items"), node.get("minItems")
        if isinstance(items, Mapping | bool) and isinstance(least, int) and least > 0:
            stack.append((items, f"the items of {where}"))
    return None


def unfenced(text: str) -> str:
    """``text`` stripped, and without the Markdown code fence around it, if it has one."""
    candidate = text.strip()
    fenced = _FENCE.match(candidate)
    return fenced.group(1).strip() if fenced else candidate


def parse_reply(text: str, schema: Mapping[str, Any]) -> tuple[str, str | None]:
    """The reply's JSON text (unwrapped from a code fence) and None, or the text and why it fails."""
    candidate = unfenced(text)
    try:
        value = json.loads(candidate)
    except json.JSONDecodeError as error:
        blocks = _BLOCK.findall(text)
        try:
            if len(blocks) != 1:
                raise error
            candidate = blocks[0].strip()
            value = json.loads(candidate)  # the one fenced block, among prose
        except json.JSONDecodeError:
            return text, f"the reply is not valid JSON ({error.msg} at character {error.pos})"
    from jsonschema import validators

    validator = validators.validator_for(schema)(schema)
    failure = next(iter(validator.iter_errors(value)), None)
    if failure is not None:
        where = "/".join(str(part) for part in failure.absolute_path) or "the top level"
        return candidate, f"the reply does not follow the JSON schema at {where}: {failure.message}"[:400]
    return candidate, None


def _depth(value: Any, level: int = 0) -> int:
    if level > MAX_SCHEMA_DEPTH:
        return level
    if isinstance(value, Mapping):
        return max((_depth(v, level + 1) for v in value.values()), default=level)
    if isinstance(value, list):
        return max((_depth(v, level + 1) for v in value), default=level)
    return level
