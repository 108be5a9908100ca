"""Test helpers: free ports, running server.py, waiting for it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "server.py"), *args]


def run_server(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(server_command(*args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def start_server(*args: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    handle = log.open("w")
    return subprocess.Popen(server_command(*args), cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)


def wait_for_health(port: int, process: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"server did not come up in {timeout}s:\n{log.read_text()[-3000:]}")


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextmanager
def running_server(root: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """server.py on a free port with its data in ``root``; yields its base URL, stops it after."""
    port = free_port()
    log = root / "server.log"
    process = start_server(*args, "--data-dir", str(root / "data"), "--port", str(port), log=log, env=env)
    try:
        wait_for_health(port, process, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_server(process)


def still_there(pid: int, timeout: float = 30) -> str | None:
    """Wait up to ``timeout`` s for process ``pid`` to be gone; None once it is, else its status.

    A zombie is not gone: it ended but its parent (this server or engine) never reaped it, and a
    server that leaks one per crash or unload fills the process table."""
    import psutil

    deadline = time.monotonic() + timeout
    while True:
        try:
            status = psutil.Process(pid).status()
        except psutil.NoSuchProcess:
            return None
        if time.monotonic() >= deadline:
            return status
        time.sleep(0.1)


def run_concurrently(fn: Callable[[Any], Any], keys: Iterable[Any], timeout: float = 300) -> dict[Any, Any]:
    """Call ``fn(key)`` for every key at the same time, each on its own thread; {key: result}."""
    results: dict[Any, Any] = {}

    def run(key: Any) -> None:
        results[key] = fn(key)

    threads = [threading.Thread(target=run, args=(key,)) for key in keys]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    return results


def assert_one_line_error(result: subprocess.CompletedProcess, expected: str, code: int | None = None) -> None:
    """A CLI failure as users should see it: non-zero exit, exactly one 'error:' line, no traceback."""
    assert result.returncode != 0, result.stdout + result.stderr
    if code is not None:
        assert result.returncode == code, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert expected in errors[0], errors[0]
    assert "Traceback" not in result.stderr


# The question the real-model tests ask. The embedded model's folder names a system message
# (engine/default_model.py), and with it greedy decoding answers "The capital of France is Paris."
# with every token at least 1.5 logits ahead of the next (measured with llama.cpp): no near-tie that
# a loader's arithmetic could tip. (With the template's own SmolLM system message the first token was a
# 0.06-logit tie between "L'Étoile…" and "The", and "Answer in one word." added ties of 0.02.)
CAPITAL_QUESTION = "What is the capital of France?"


def main_thread_wakeups(pid: int, seconds: float = 2.0) -> float:
    """How often a process's main thread went to sleep and woke, per second, over ``seconds``
    (its context switches, from /proc): an idle event loop that polls shows it."""
    def switches() -> int:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/task/{pid}/status").read_text().splitlines()
                      if ":" in line)
        return int(fields["voluntary_ctxt_switches"]) + int(fields["nonvoluntary_ctxt_switches"])

    before = switches()
    time.sleep(seconds)
    return (switches() - before) / seconds
