"""The LoadedModel base class: each of stream and stream_to is made from the other; pump."""

import threading
import time

import pytest

from loadstar import CancelToken, LoadedModel, LoadedModelInfo, SamplingParams, StreamPiece, pump

INFO = LoadedModelInfo(name="m", loader="L", device="cpu", dtype="none", context_length=None)


class Pushes(LoadedModel):
    """Implements only stream_to, as the Transformers model does."""

    def __init__(self, fail: bool = False) -> None:
        self.info = INFO
        self.fail = fail
        self.threads: set[str] = set()

    def stream_to(self, prompt, params, cancel, *, seed, emit, output=None):
        self.threads.add(threading.current_thread().name)
        for word in prompt.split():
            if cancel.cancelled:
                return
            emit(StreamPiece(word, 1))
        if self.fail:
            raise RuntimeError("the library broke")


class Yields(LoadedModel):
    """Implements only stream."""

    info = INFO

    def stream(self, prompt, params, cancel, *, seed, output=None):
        yield from (StreamPiece(word, 1) for word in prompt.split())


def test_stream_is_made_from_stream_to_on_a_helper_thread():
    model = Pushes()
    pieces = [p.text for p in model.stream("a b c", SamplingParams(), CancelToken(), seed=1)]
    assert pieces == ["a", "b", "c"]
    assert model.threads == {"loadstar-generate"}


def test_an_error_in_stream_to_is_raised_to_the_consumer():
    with pytest.raises(RuntimeError, match="the library broke"):
        list(Pushes(fail=True).stream("a", SamplingParams(), CancelToken(), seed=1))


class Endless(LoadedModel):
    """Generates until its token is cancelled, as a real model does for a long reply."""

    info = INFO

    def stream_to(self, prompt, params, cancel, *, seed, emit, output=None):
        while not cancel.cancelled:
            emit(StreamPiece("w", 1))
            time.sleep(0.001)


def test_closing_the_stream_early_stops_the_producer_at_once():
    stream = Endless().stream("go", SamplingParams(), CancelToken(), seed=1)
    assert next(stream).text == "w"
    started = time.monotonic()
    stream.close()  # the consumer went away: the helper sees a cancelled token and ends
    assert time.monotonic() - started < 2  # not the pump's 5-second join limit
    assert not [t for t in threading.enumerate() if t.name == "loadstar-generate"]


def test_stream_to_is_made_from_stream_and_stops_when_cancelled():
    got: list[str] = []
    cancel = CancelToken()

    def emit(piece: StreamPiece) -> None:
        got.append(piece.text)
        if len(got) == 2:
            cancel.cancel()

    Yields().stream_to("a b c d", SamplingParams(), cancel, seed=1, emit=emit)
    assert got == ["a", "b"]


def test_a_model_with_neither_says_so():
    class Empty(LoadedModel):
        info = INFO

    with pytest.raises(NotImplementedError, match="implements neither stream nor stream_to"):
        list(Empty().stream("a", SamplingParams(), CancelToken(), seed=1))
    assert (Empty.chat_template, dict(Empty.special_tokens), Empty.max_batch) == (None, {}, 1)


def test_pump_ends_on_cancel_while_the_producer_is_silent_and_calls_stop():
    cancel, released, stopped = CancelToken(), threading.Event(), []

    def produce(put):
        put("first")
        released.wait(10)  # silent, as a server that has not answered

    def stop():
        stopped.append(True)
        released.set()  # what closing the connection does to a reader

    items = pump(produce, cancel=cancel, poll=0.05, stop=stop)
    assert next(items) == "first"
    cancel.cancel()
    assert list(items) == []
    assert stopped == [True]
