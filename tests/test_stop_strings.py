import pytest

from loadstar.engine.errors import BadRequestError
from loadstar.engine.generation.requests import GenerationRequest, TextDelta
from loadstar.engine.generation.service import GenerationService
from loadstar.engine.generation.stop_strings import StopStringFilter
from loadstar.engine.sampling import SamplingParams
from tests.fakes import FakeModel
from tests.test_generation import Slot


def run(stops, pieces):
    f = StopStringFilter(tuple(stops))
    shown = [f.feed(p) for p in pieces]
    return shown, f.flush(), f.stopped


def test_stop_string_split_across_pieces_is_cut_and_never_shown():
    shown, tail, stopped = run(["</s>"], ["Hello", " world<", "/", "s>", " more"])
    assert "".join(shown) + tail == "Hello world"
    assert stopped
    assert all("<" not in s for s in shown)  # the partial "<" was held back, not shown and retracted


def test_partial_match_that_fails_is_released():
    shown, tail, stopped = run(["STOP"], ["ST", "ART here", " ST"])
    assert shown == ["", "START here", " "] and tail == "ST" and not stopped


def test_earliest_of_several_stops_wins():
    shown, _, stopped = run(["world", "lo"], ["Hello world"])
    assert shown == ["Hel"] and stopped


def test_service_stops_generation_at_the_stop_string():
    slot = Slot(FakeModel(reply="one two three four five"))
    service = GenerationService(slot)
    try:
        request = GenerationRequest(prompt="x", params=SamplingParams(), stop=("ee fo",))
        handle = service.submit(request)
        events = list(handle.events())
        final = events[-1]
        assert (final.reason, final.text) == ("stop", "one two thr")
        assert "".join(e.text for e in events if isinstance(e, TextDelta)) == final.text
        assert final.completion_tokens == 4  # generation ended there, "five" never came
    finally:
        service.close()
        slot.client.unload()


@pytest.mark.parametrize("stop", [("",), tuple("x" * 17), ("y" * 257,)])
def test_bad_stop_strings_are_rejected(stop):
    with pytest.raises(BadRequestError, match="stop strings"):
        GenerationRequest(prompt="x", stop=stop)
