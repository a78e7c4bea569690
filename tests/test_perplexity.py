"""Perplexity protocol details (SparseGPT/Wanda/BESA windows) on a tiny model and a known token stream."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from besa_pl.eval.perplexity import evaluation_text, perplexity, windows

from .conftest import DATA_DIR


def test_windows_are_non_overlapping_and_drop_the_tail():
    ids = torch.arange(5 * 32 + 7)
    batches = windows(ids, 32)
    assert batches.shape == (5, 32)
    assert torch.equal(batches.reshape(-1), ids[: 5 * 32])
    assert windows(ids, 32, max_windows=2).shape == (2, 32)
    assert windows(torch.arange(31), 32).shape == (0, 32)


def test_perplexity_is_exp_of_mean_window_loss_whatever_the_batch_size(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama")).eval()
    ids = torch.randint(0, 512, (4 * 48 + 11,), generator=torch.Generator().manual_seed(0))
    batches = windows(ids, 48)
    with torch.no_grad():
        losses = [float(model(w.unsqueeze(0), labels=w.unsqueeze(0)).loss) for w in batches]
    expected = math.exp(sum(losses) / len(losses))
    assert perplexity(model, batches, batch_size=1) == pytest.approx(expected, rel=1e-5)
    per_window = []
    assert perplexity(model, batches, batch_size=3, per_window=per_window) == pytest.approx(expected, rel=1e-5)
    assert per_window == pytest.approx(losses, rel=1e-5)  # each window's loss, for first-k perplexities later


@pytest.mark.integration
def test_corpora_are_joined_as_the_protocol_says():
    wiki, _ = evaluation_text("wikitext2", str(DATA_DIR))
    raw = (DATA_DIR / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")
    # 4358 HF rows joined with "\n\n"; blank lines (a lone space in the file) become "".
    assert wiki.count("\n\n") >= 4357
    assert wiki.startswith("\n\n = Robert Boulter = \n")
    assert len(wiki) == len(raw) - 2 * 1467 + 2 * 4357
    ptb, _ = evaluation_text("ptb", str(DATA_DIR))
    assert ptb.startswith("no it was n't black monday but")
    # the validation split, for choosing settings, never the test sentences
    valid, source = evaluation_text("ptb-valid", str(DATA_DIR))
    assert source.endswith("ptb.valid.txt") and valid.startswith("consumers may want to move their telephones")
    assert "no it was n't black monday but" not in valid
    c4, source = evaluation_text("c4", str(DATA_DIR))
    assert "excerpt" in source and c4.startswith("We offer valet parking")


def test_corpora_are_joined_as_the_protocol_says_on_a_generated_data_folder(tiny_data_dir):
    """The same joins on a folder laid out like the real one (runs without the real data)."""
    lines = (tiny_data_dir / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8").splitlines(keepends=True)
    wiki, source = evaluation_text("wikitext2", str(tiny_data_dir))
    assert source == str(tiny_data_dir / "wikitext-2-raw" / "wiki.test.raw")
    # one row per line, joined with "\n\n"; a blank line (a lone space) is an empty row
    blank = sum(1 for line in lines if not line.strip())
    assert 0 < blank < len(lines)
    assert wiki == "\n\n".join(line if line.strip() else "" for line in lines)
    assert len(wiki) == sum(map(len, lines)) - 2 * blank + 2 * (len(lines) - 1)  # as on the real file
    ptb_lines = (tiny_data_dir / "ptb" / "ptb.test.txt").read_text(encoding="utf-8").splitlines()
    ptb, _ = evaluation_text("ptb", str(tiny_data_dir))
    assert ptb == " ".join(line.strip() for line in ptb_lines)
    valid, source = evaluation_text("ptb-valid", str(tiny_data_dir))
    assert (
        source.endswith("ptb.valid.txt")
        and valid != ptb
        and valid.split(" ")[0] == ((tiny_data_dir / "ptb" / "ptb.valid.txt").read_text(encoding="utf-8").split()[0])
    )
    c4, source = evaluation_text("c4", str(tiny_data_dir))
    assert source.endswith("c4_validation_2k.parquet (local C4 validation excerpt standing in for shard 00000)")
    import pyarrow.parquet as pq

    docs = pq.read_table(tiny_data_dir / "c4" / "c4_validation_2k.parquet").column("text").to_pylist()
    assert c4 == " ".join(docs[:1100])
