"""bench/quality.py keeps every earlier code state of a run in its archive."""

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
