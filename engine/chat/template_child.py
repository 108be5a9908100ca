"""The child process that renders chat templates (started by ``engine.template_sandbox``).

Reads one JSON request per line on stdin, answers one JSON line on stdout. It imports only Jinja,
renders in the immutable sandbox, and runs under an address-space limit; the parent kills it when
a render takes too long. Run as ``python template_child.py LIMIT_BYTES MAX_OUTPUT_CHARS`` (see template_sandbox._boot_code).
"""

from __future__ import annotations

import json
import sys
from datetime import datetime
from typing import Any


class _Raised(Exception):
    """A template called ``raise_exception``: its way of refusing a conversation."""


def _environment() -> Any:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise _Raised(message)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        """Plain JSON text, as transformers renders it: Jinja's own filter returns Markup, and a
        string added to Markup is HTML-escaped (a call rendered as ``&lt;tool_call&gt;``)."""
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    return env


def _answer(env: Any, compiled: dict[str, Any], request: dict[str, Any], max_output: int) -> dict[str, str]:
    from jinja2 import TemplateError

    template = request["template"]
    try:
        if template not in compiled:
            if len(compiled) >= 32:
                compiled.clear()
            compiled[template] = env.from_string(template)
        pieces, size = [], 0
        for piece in compiled[template].generate(**request["variables"]):
            size += len(piece)
            if size > max_output:
                return {"error": f"it renders to more than {max_output} characters"}
            pieces.append(piece)
        return {"ok": "".join(pieces)}
    except _Raised as refusal:
        return {"raised": str(refusal)}
    except TemplateError as error:
        return {"error": str(error).splitlines()[0] if str(error) else error.__class__.__name__}
    except MemoryError:
        return {"error": "it needs more memory than a template may use"}
    except RecursionError:
        return {"error": "it nests too deeply"}
    except Exception as error:  # a template's own runtime error (a bad index, a type mix-up)
        return {"error": f"{error.__class__.__name__}: {str(error).splitlines()[0] if str(error) else ''}".rstrip(": ")}


def main(argv: list[str]) -> int:
    import resource

    limit, max_output = int(argv[0]), int(argv[1])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    env = _environment()
    compiled: dict[str, Any] = {}
    out = sys.stdout
    out.write('{"ready": true}\n')
    out.flush()
    for line in sys.stdin:
        try:
            answer = _answer(env, compiled, json.loads(line), max_output)
        except (ValueError, KeyError, TypeError):
            answer = {"error": "bad request to the template process"}
        out.write(json.dumps(answer) + "\n")
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
