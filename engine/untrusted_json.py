"""JSON that a model repository or a Hub supplied: bounded in size and in depth, refused in one line.

Python's parser recurses once per level: a file of 100,000 ``[`` raises ``RecursionError``, which
escaped a folder's inspection and broke the model list for every client. Real configs nest a few
levels (a quantization config inside config.json: 3), so anything deeper than ``MAX_DEPTH`` is
refused even when it parses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MAX_DEPTH = 64  # levels of objects and arrays
MAX_BYTES = 16 << 20  # a config, a tokenizer config with its chat template, a safetensors header
TOO_DEEP = f"is nested too deeply (over {MAX_DEPTH} levels)"

__all__ = ["MAX_BYTES", "MAX_DEPTH", "UntrustedJsonError", "parse_untrusted_json", "read_untrusted_json"]


class UntrustedJsonError(ValueError):
    """A file's JSON refused: the message is one line that names the file; ``why`` is the reason alone."""

    def __init__(self, name: str, why: str) -> None:
        super().__init__(f"{name} {why}")
        self.why = why


def read_untrusted_json(path: Path, *, max_bytes: int = MAX_BYTES) -> Any:
    """The parsed contents of ``path``, checked before it is read (size) and after (depth)."""
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise UntrustedJsonError(path.name, f"is larger than {max_bytes >> 20} MiB")
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise UntrustedJsonError(path.name, "is not valid JSON (not UTF-8)") from None
    except OSError as error:
        raise UntrustedJsonError(path.name, f"could not be read ({error.strerror or error.__class__.__name__})") from None
    return parse_untrusted_json(text, path.name)


def parse_untrusted_json(text: str | bytes, name: str) -> Any:
    """``json.loads`` of ``text`` (from ``name``), never deeper than ``MAX_DEPTH``."""
    try:
        data = json.loads(text)
    except RecursionError:
        raise UntrustedJsonError(name, TOO_DEEP) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UntrustedJsonError(name, f"is not valid JSON ({error.__class__.__name__})") from None
    if _depth(data) > MAX_DEPTH:
        raise UntrustedJsonError(name, TOO_DEEP)
    return data


def _depth(data: Any) -> int:
    """How many levels of objects and arrays ``data`` has, without recursion."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        value, level = stack.pop()
        if isinstance(value, dict):
            children: Any = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        deepest = max(deepest, level)
        if deepest > MAX_DEPTH:
            return deepest
        stack.extend((child, level + 1) for child in children)
    return deepest
