"""bench/selection.py chooses defaults on held-out text only: its reader refuses every test split."""

import importlib.util

import pytest

from .conftest import REPO


@pytest.fixture(scope="module")
def selection():
    spec = importlib.util.spec_from_file_location("bench_selection", REPO / "bench" / "selection.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["wikitext2", "ptb", "c4"])
def test_the_selection_refuses_to_read_a_test_split(selection, name):
    with pytest.raises(SystemExit, match=f"bench/selection.py: {name} is a test split; choose settings on heldout"):
        selection.held_out(["heldout", name])


def test_the_selection_reads_only_held_out_text(selection):
    assert selection.held_out(["heldout", "ptb-valid"]) == ["heldout", "ptb-valid"]
    with pytest.raises(SystemExit, match="unknown evaluation 'piqa'"):
        selection.held_out(["piqa"])


def test_every_candidate_is_scored_on_the_held_out_sets_only(selection):
    assert selection.HELD_OUT == ("heldout", "ptb-valid")
    assert selection.score({"heldout": 10.0, "ptb-valid": 10.0}) == pytest.approx(2.302585, abs=1e-6)
