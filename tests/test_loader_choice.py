import pytest

from loadstar.engine.errors import NoLoaderError
from loadstar.engine.models.choice import choose_loader, rank_loaders
from loadstar.engine.models.folder import inspect_model_folder
from tests.fakes import FakeLoader
from tests.folders import hf_folder


@pytest.fixture
def folder(tmp_path):
    return inspect_model_folder(hf_folder(tmp_path))


def as_map(*loaders):
    return {loader.name: loader for loader in loaders}


def test_highest_priority_wins_regardless_of_registration_order(folder):
    low, high = FakeLoader("Low", priority=10), FakeLoader("High", priority=90)
    assert choose_loader(folder, as_map(low, high)).loader == "High"
    assert choose_loader(folder, as_map(high, low)).loader == "High"


def test_ties_are_broken_by_name_not_by_order(folder):
    b, a = FakeLoader("Beta"), FakeLoader("alpha")
    assert [c.loader for c in rank_loaders(folder, as_map(b, a))] == ["alpha", "Beta"]


def test_unusable_loaders_are_listed_after_usable_ones_with_reasons(folder):
    loaders = as_map(
        FakeLoader("Missing", available=False, priority=100),
        FakeLoader("Unfit", can_load=False, reason="8-bit: only 4-bit is supported", priority=100),
        FakeLoader("Fit", priority=5, reason="works"),
    )
    ranked = rank_loaders(folder, loaders)
    assert next(c.loader for c in ranked) == "Fit"
    described = {c.loader: c.describe() for c in ranked}
    assert described["Missing"] == "Missing: unavailable, fake package missing"
    assert described["Unfit"] == "Unfit: cannot load, 8-bit: only 4-bit is supported"
    assert described["Fit"] == "Fit: can load (priority 5), works"


def test_pinned_loader_wins_over_higher_priority(folder):
    loaders = as_map(FakeLoader("Best", priority=100), FakeLoader("Mine", priority=1))
    chosen = choose_loader(folder, loaders, pinned="Mine")
    assert chosen.loader == "Mine" and chosen.pinned
    assert rank_loaders(folder, loaders, pinned="Mine")[0].loader == "Mine"


def test_pinned_loader_that_cannot_load_fails_with_its_reason(folder):
    loaders = as_map(FakeLoader("Best"), FakeLoader("Mine", can_load=False, reason="needs CUDA"))
    with pytest.raises(NoLoaderError, match=r"Mine: cannot load.*needs CUDA"):
        choose_loader(folder, loaders, pinned="Mine")


def test_unknown_pinned_loader_names_the_known_ones(folder):
    with pytest.raises(NoLoaderError, match="unknown loader 'Nope' \\(known loaders: A\\)"):
        choose_loader(folder, as_map(FakeLoader("A")), pinned="Nope")


def test_no_usable_loader_explains_each(folder):
    loaders = as_map(FakeLoader("A", can_load=False, reason="wrong format"), FakeLoader("B", available=False))
    with pytest.raises(NoLoaderError, match="no loader can load plain: A: cannot load, wrong format; B: unavailable"):
        choose_loader(folder, loaders)


def test_folder_without_weights_says_so(tmp_path):
    empty = inspect_model_folder(hf_folder(tmp_path, name="empty", weights=()))
    with pytest.raises(NoLoaderError, match="empty holds no weight files"):
        choose_loader(empty, as_map(FakeLoader("A", can_load=False)))


def test_a_loader_that_raises_is_listed_as_an_error_and_others_still_work(folder):
    loaders = as_map(FakeLoader("Broken", raise_in_assess=True, priority=100), FakeLoader("Fine"))
    ranked = rank_loaders(folder, loaders)
    assert ranked[0].loader == "Fine"
    broken = next(c for c in ranked if c.loader == "Broken")
    assert not broken.usable and "assess exploded" in broken.reason
