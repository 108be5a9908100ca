"""Chat templates render in a child process with a time and a memory bound.

A chat template comes with the model: untrusted input. Jinja's immutable sandbox stops attribute
walks and mutation, but not ``{% for %}`` loops nested three deep, ``'x' * 10**9`` or ``9**9999999``.
Those would hold the model's lane (and every later request) for good. So templates render in a
child process (``template_child.py``) under an address-space limit; a render that has not
answered within ``timeout`` seconds is refused, the child is killed and a fresh one starts on the
next render. Rendering a chat takes ~0.1 ms, so the bound costs a round trip on a pipe.
"""

from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import sys
import threading
import time
from typing import Any

from loadstar.engine.errors import BadRequestError

log = logging.getLogger(__name__)

RENDER_TIMEOUT = 1.5  # seconds; a legitimate render takes well under a millisecond
START_TIMEOUT = 60.0  # seconds for the child to start (a loaded 2-core machine is slow)
MEMORY_LIMIT = 1024 * 1024 * 1024  # address space of the child
MAX_OUTPUT_CHARS = 4 * 1024 * 1024


class TemplateRaised(Exception):
    """A template called ``raise_exception`` (its way of refusing a conversation)."""


class TemplateRenderer:
    """One child process, started on first use, shared by callers one render at a time."""

    def __init__(self, timeout: float = RENDER_TIMEOUT, memory_limit: int = MEMORY_LIMIT) -> None:
        self.timeout = timeout
        self.memory_limit = memory_limit
        self._lock = threading.Lock()
        self._child: subprocess.Popen[bytes] | None = None
        self._buffer = b""

    def render(self, template: str, variables: dict[str, Any], what: str) -> str:
        """The rendered text; ``TemplateRaised`` for a refusal, else a one-line ``BadRequestError``."""
        request = (json.dumps({"template": template, "variables": variables}) + "\n").encode()
        with self._lock:
            child = self._started()
            try:
                assert child.stdin is not None
                child.stdin.write(request)
                child.stdin.flush()
                answer = self._read_line(child, time.monotonic() + self.timeout)
            except (OSError, ValueError):
                answer = None
            if answer is None:
                self._stop()
                raise BadRequestError(
                    f"the {what} prompt format took longer than {self.timeout:g} s or too much memory to render: refused"
                )
        if "raised" in answer:
            raise TemplateRaised(answer["raised"])
        if "error" in answer:
            raise BadRequestError(f"the {what} prompt format could not be rendered: {answer['error']}")
        return answer["ok"]

    def close(self) -> None:
        with self._lock:
            self._stop()

    # -- the child -----------------------------------------------------------------------------

    def _started(self) -> subprocess.Popen[bytes]:
        if self._child is not None and self._child.poll() is None:
            return self._child
        self._stop()
        here = os.path.dirname(os.path.abspath(__file__))  # template_child.py's folder
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0"}
        self._child = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _boot_code(), here, str(self.memory_limit), str(MAX_OUTPUT_CHARS)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, close_fds=True,
        )
        self._buffer = b""
        if self._read_line(self._child, time.monotonic() + START_TIMEOUT) != {"ready": True}:
            self._stop()
            raise BadRequestError("the template process did not start")
        return self._child

    def _read_line(self, child: subprocess.Popen[bytes], deadline: float) -> dict[str, Any] | None:
        assert child.stdout is not None
        fd = child.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return None
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        try:
            answer = json.loads(line)
        except ValueError:
            return None
        return answer if isinstance(answer, dict) else None

    def _stop(self) -> None:
        child, self._child = self._child, None
        if child is None:
            return
        child.kill()
        try:
            child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log.warning("the template process did not exit after kill")
        for stream in (child.stdin, child.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass


def _boot_code() -> str:
    """The child runs isolated (-I -S: no user site, no .pth files) with the parent's import path.

    It imports ``template_child`` from its own folder by file, as a top-level module: the child
    needs only the standard library and Jinja, never the ``loadstar`` package (whose editable
    install is found through a .pth file that -S skips).
    """
    return (
        "import sys; sys.path[:0] = [sys.argv[1]] + " + repr([p for p in sys.path if p]) + "; "
        "from template_child import main; sys.exit(main(sys.argv[2:]))"
    )
