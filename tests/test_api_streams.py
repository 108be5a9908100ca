"""Many open streams cost no threads: events reach the event loop without one (fake batching model,
a real uvicorn server and real HTTP clients)."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn

from loadstar.api.app import build_http_app
from loadstar.engine.facade import Engine
from tests.fakes import FakeBatchModel, FakeLoader, engine_with
from tests.folders import hf_folder

STREAMS = int(os.environ.get("STREAMS", "150"))
WORDS = int(os.environ.get("WORDS", "60"))  # each stream lasts WORDS steps of 0.05 s: long enough to hold them all open at once


class BatchLoader(FakeLoader):
    def load(self, folder, options):
        return FakeBatchModel(max_batch=STREAMS, delay=0.05, reply=" ".join(["word"] * WORDS), name=folder.name)


@pytest.fixture
def server(tmp_path):
    with fake_batch_server(tmp_path) as running:
        yield running


@contextmanager
def fake_batch_server(tmp_path: Path) -> Iterator[tuple[Engine, str]]:
    """A real uvicorn server over the real app, with a fake model that batches STREAMS requests."""
    engine = engine_with(tmp_path, BatchLoader("Batch"), queue_timeout=60.0, api_max_tokens=WORDS)
    hf_folder(tmp_path / "models", "batch-model")
    engine.load_model("batch-model")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(build_http_app(engine), log_level="warning", limit_concurrency=1000)
    served = uvicorn.Server(config)
    thread = threading.Thread(target=served.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not served.started:
        time.sleep(0.05)
    try:
        yield engine, f"http://127.0.0.1:{port}"
    finally:
        served.should_exit = True
        thread.join(30)
        engine.close()


async def open_streams(base: str, count: int, opened: asyncio.Event, results: list[str]) -> None:
    body = {"model": "anything", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    limits = httpx.Limits(max_connections=count + 10, max_keepalive_connections=count + 10)
    started = 0

    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=120) as client:
        async def one() -> None:
            nonlocal started
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                assert response.status_code == 200
                text = []
                async for line in response.aiter_lines():
                    if line.startswith("data: {") and '"content"' in line:
                        if not text:
                            started += 1
                            if started == count:
                                opened.set()
                        text.append(line)
                    if line == "data: [DONE]":
                        results.append("done")

        await asyncio.gather(*(one() for _ in range(count)))


def while_streams_are_open(base: str, during, results: list[str]):
    """Open STREAMS streams, call ``during()`` once all have started, wait for them to end;
    returns what ``during`` returned."""
    box: dict[str, object] = {}

    def streams() -> None:
        async def main() -> None:
            opened = asyncio.Event()
            task = asyncio.create_task(open_streams(base, STREAMS, opened, results))
            await asyncio.wait_for(opened.wait(), 120)
            box["opened"] = time.monotonic()
            await task
        asyncio.run(main())

    runner = threading.Thread(target=streams)
    runner.start()
    deadline = time.monotonic() + 180
    while "opened" not in box and time.monotonic() < deadline and runner.is_alive():
        time.sleep(0.05)
    assert "opened" in box, "the streams did not all start"
    try:
        return during()
    finally:
        runner.join(180)


def test_150_open_streams_take_no_threads_and_health_answers(server):
    engine, base = server
    with httpx.Client(base_url=base, timeout=60) as client:
        assert client.get("/health").status_code == 200  # the server's pools are warm
    threads_before = threading.active_count()
    results: list[str] = []

    def during():
        peak = threading.active_count()
        with httpx.Client(base_url=base, timeout=60) as client:
            health = [client.get("/health").status_code for _ in range(20)]
        assert engine.generation.running == STREAMS  # all open at once, in one batch
        return health, max(peak, threading.active_count())

    health, peak_threads = while_streams_are_open(base, during, results)
    assert results == ["done"] * STREAMS
    assert health == [200] * 20
    # the client side's event loop is one thread; the server added none per stream
    assert peak_threads <= threads_before + 5, (threads_before, peak_threads)


def _serve_until_stdin_closes() -> None:
    """``python -m tests.test_api_streams serve``: the fake batching server for the benchmark, in a
    process of its own; prints its URL and pid, stops when stdin closes."""
    import sys
    import tempfile

    with fake_batch_server(Path(tempfile.mkdtemp(prefix="streams-server-"))) as (_engine, base):
        print(base, flush=True)
        sys.stdin.read()


def _streams_then_exit(base: str, count: int) -> None:
    """``python -m tests.test_api_streams streams URL N``: open N streams, print when all started, wait."""
    results: list[str] = []

    async def main() -> None:
        opened = asyncio.Event()
        task = asyncio.create_task(open_streams(base, count, opened, results))
        await asyncio.wait_for(opened.wait(), 120)
        print("opened", flush=True)
        await task
        print(f"done {len(results)}", flush=True)

    asyncio.run(main())


if __name__ == "__main__":
    import sys

    if sys.argv[1] == "serve":
        _serve_until_stdin_closes()
    else:
        _streams_then_exit(sys.argv[2], int(sys.argv[3]))
