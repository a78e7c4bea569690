"""bench/quality.py keeps every earlier code state of a run in its archive; bench/quality_table.py never mixes machines in one table."""

import json

import pytest

from .conftest import REPO, load_file


@pytest.fixture(scope="module")
def quality():
    return load_file(REPO / "bench" / "quality.py")


def test_a_stale_run_is_archived_under_its_code_commit_without_replacing_an_older_one(quality, tmp_path):
    folder = tmp_path / "archive"
    run = tmp_path / "besa-s0.5-64x256-w40.json"
    for state, ppl in [("aaa1111", 35.0), ("bbb2222", 34.0), ("bbb2222", 33.0)]:
        run.write_text(json.dumps({"code_commit": state, "perplexity": {"wikitext2": ppl}}))
        quality.archive_stale(run, json.loads(run.read_text()), folder)
        assert not run.exists()
    kept = {p.name: json.loads(p.read_text())["perplexity"]["wikitext2"] for p in folder.iterdir()}
    assert kept == {
        "besa-s0.5-64x256-w40@aaa1111.json": 35.0,
        "besa-s0.5-64x256-w40@bbb2222.json": 34.0,
        "besa-s0.5-64x256-w40@bbb2222-1.json": 33.0,
    }


def _stored_run(folder, name, seed, cpu, ppl, code="abc1234"):
    """A result file as bench/quality.py writes it, with the fields the table reads."""
    sparsity = 0.0 if name == "dense" else 0.5
    suffix = f"-seed{seed}" if seed else ""
    env = {"torch": "2.13.0+cpu", "transformers": "5.24.0", "lightning": "2.6.6", "torch_threads": 2, "cpu": cpu}
    run = {
        "run": name,
        "model": "demo",
        "sparsity": sparsity,
        "settings": {"method": name},
        "code_commit": code,
        "commit": code,
        "environment": env,
        "perplexity": {"wikitext2": ppl},
        "perplexity_details": {"wikitext2": {"windows": 40, "all_windows": False}},
        "realised_sparsity": sparsity,
        "calibration": f"64 x 256 tokens, c4, seed {seed}",
        "command": f"python bench/quality.py --seed {seed} --runs {name}",
    }
    (folder / f"{name}-s{sparsity}-64x256{suffix}-w40.json").write_text(json.dumps(run))


def _seed0_on_intel(results):
    """A results folder holding dense, SparseGPT (44) and the default (35) at seed 0 from one machine."""
    folder = results / "runs" / "demo"
    folder.mkdir(parents=True)
    for name, ppl in [("dense", 20.0), ("sparsegpt", 44.0), ("besa", 35.0)]:
        _stored_run(folder, name, 0, "Intel", ppl)
    return folder


@pytest.fixture(scope="module")
def quality_table():
    return load_file(REPO / "bench" / "quality_table.py")


def test_runs_of_another_machine_get_a_table_of_their_own_with_their_own_references(quality_table, tmp_path):
    folder = _seed0_on_intel(tmp_path)
    _stored_run(folder, "dense", 1, "AMD", 21.0)
    for seed, sparsegpt, besa in [(1, 43.0, 34.0), (2, 45.0, 31.0)]:
        _stored_run(folder, "sparsegpt", seed, "AMD", sparsegpt)
        _stored_run(folder, "besa", seed, "AMD", besa)
    _stored_run(folder, "besa", 3, "Intel", 99.0, code="old0000")  # other code: in no table
    quality_table.write_table(tmp_path, "64x256", "abc1234")
    text = (tmp_path / "quality-64x256.md").read_text()
    # the machine with the most rows (AMD here) comes first and names the header's environment
    assert "environment per table: torch 2.13.0+cpu" in text and "cpu AMD, unless its title names another" in text
    amd, intel = text.split("### sparsity 0.5")[1:3]
    assert intel.startswith(" (cpu Intel): ") and "| besa | 1 | 0.5000 | 35.00 | 0.625 |" in intel
    # each seed against its own draw's SparseGPT and the AMD dense model: (34-21)/(43-21), (31-21)/(45-21)
    ratios = [(34 - 21) / (43 - 21), (31 - 21) / (45 - 21)]
    mean = sum(ratios) / 2
    sd = (sum((r - mean) ** 2 for r in ratios)) ** 0.5
    assert amd.startswith(": ") and f"| besa | 2 | 0.5000 | 32.50 +/- 2.12 | {mean:.3f} +/- {sd:.3f} |" in amd
    assert "- besa per seed: seed 1 34.00, seed 2 31.00" in amd
    assert "99.00" not in text


def test_a_table_without_a_dense_run_of_its_own_machine_is_refused(quality_table, tmp_path):
    folder = _seed0_on_intel(tmp_path)
    _stored_run(folder, "besa", 1, "AMD", 34.0)
    with pytest.raises(SystemExit, match=r"demo 0\.5 \(cpu AMD\): rows from 2 code commits / environments"):
        quality_table.write_table(tmp_path, "64x256", "abc1234")
