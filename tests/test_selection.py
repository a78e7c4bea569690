"""bench/selection.py chooses defaults on held-out text only: its reader refuses every test split."""

import json
from types import SimpleNamespace

import pytest

from .conftest import REPO, load_file


@pytest.fixture(scope="module")
def selection():
    return load_file(REPO / "bench" / "selection.py")


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


def test_each_candidate_is_pruned_into_its_own_folder_and_stored_with_its_held_out_score(
    selection, tmp_path, monkeypatch
):
    seen = []

    def fake_run_one(name, settings, sparsity, root, args):  # quality.run_one's signature
        seen.append((name, settings["nm_lr"], root, args.ppl))
        return {"perplexity": {"heldout": 90.0, "ptb-valid": 150.0}}

    monkeypatch.setattr(selection, "run_one", fake_run_one)
    monkeypatch.setattr(selection, "RESULTS", tmp_path)
    args = SimpleNamespace(
        model="demo",
        nsamples=8,
        seqlen=32,
        data_dir=None,
        max_windows=2,
        out=str(tmp_path / "runs"),
        candidates=["lr-0.01", "lr-0.003"],
        force=False,
    )
    selection.measure("nm_lr", args)
    assert [(n, lr) for n, lr, _, _ in seen] == [("select-nm_lr-lr-0.01", 0.01), ("select-nm_lr-lr-0.003", 0.003)]
    assert len({root for _, _, root, _ in seen}) == 2 and all(ppl == ["heldout", "ptb-valid"] for *_, ppl in seen)
    stored = json.loads((tmp_path / "selection" / "nm_lr" / "lr-0.003-8x32-w2.json").read_text())
    assert stored["perplexity"] == {"heldout": 90.0, "ptb-valid": 150.0}
