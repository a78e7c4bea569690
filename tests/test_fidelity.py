"""Fidelity to the dense model: KL and top-1 agreement on text the dense model writes, no data needed."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from besa_pl.eval.fidelity import FidelityTotals, streamed_fidelity
from besa_pl.models.loading import decoder_blocks, prunable_linears
from besa_pl.models.source import ModelSource
from besa_pl.settings import PruneSettings

from .conftest import fit_args, run_cli


def token_ids(rows: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def pruned_copy(tiny_model_dir, tmp_path_factory):
    """The tiny model with half of every block linear's weights (the smallest) set to zero."""
    dense = tiny_model_dir("llama")
    folder = tmp_path_factory.mktemp("pruned-llama")
    model = AutoModelForCausalLM.from_pretrained(dense)
    with torch.no_grad():
        for block in decoder_blocks(model):
            for linear in prunable_linears(block).values():
                weight = linear.weight
                weight[weight.abs() <= weight.abs().median()] = 0
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (dense / name).exists():
            shutil.copy(dense / name, folder / name)
    return dense, folder


def test_the_dense_model_against_itself_has_zero_kl_and_full_agreement(tiny_model_dir):
    folder = tiny_model_dir("llama")
    source = ModelSource(str(folder), PruneSettings())
    found = streamed_fidelity(source, folder, token_ids(3, 24, source.config.vocab_size), "cpu", batch_size=2)
    assert found["kl"] == 0.0
    assert found["top1_agreement"] == 1.0
    assert found["perplexity_pruned"] == found["perplexity_dense"]
    assert found["positions"] == 3 * 23


def test_a_pruned_model_has_positive_kl_and_streaming_equals_the_whole_models(pruned_copy):
    dense, pruned = pruned_copy
    source = ModelSource(str(dense), PruneSettings())
    ids = token_ids(4, 32, source.config.vocab_size, seed=1)
    streamed = streamed_fidelity(source, pruned, ids, "cpu", batch_size=3)
    assert streamed["kl"] > 0
    assert streamed["top1_agreement"] < 1
    whole = FidelityTotals()
    with torch.no_grad():
        dense_logits = AutoModelForCausalLM.from_pretrained(dense).eval()(ids, use_cache=False).logits
        pruned_logits = AutoModelForCausalLM.from_pretrained(pruned).eval()(ids, use_cache=False).logits
    whole.add(dense_logits, pruned_logits, ids)
    expected = whole.summary()
    for key in ("kl", "perplexity_dense", "perplexity_pruned"):
        assert streamed[key] == pytest.approx(expected[key], rel=1e-4), key
    assert streamed["top1_agreement"] == pytest.approx(expected["top1_agreement"], abs=1 / streamed["positions"])


def test_kl_is_the_dense_models_expectation_of_the_log_ratio():
    dense = torch.tensor([[[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]]])
    pruned = torch.tensor([[[0.5, 1.0, -1.0], [0.0, 0.0, 0.0]]])
    totals = FidelityTotals()
    totals.add(dense, pruned, torch.tensor([[0, 1]]))
    p, q = torch.log_softmax(dense[0, 0], -1), torch.log_softmax(pruned[0, 0], -1)
    summary = totals.summary()
    assert summary["kl"] == pytest.approx(float((p.exp() * (p - q)).sum()))
    assert summary["top1_agreement"] == 0.0  # dense picks token 0, pruned token 1
    assert summary["positions"] == 1


def test_the_seed_of_self_calibration_is_refused(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BESA_CACHE", str(tmp_path / "cache"))
    with pytest.raises(SystemExit):
        run_cli(
            [
                *fit_args(tiny_model_dir("llama"), "self", tmp_path / "run", "--model.method", "magnitude"),
                "--trainer.callbacks+=besa_pl.callbacks.FidelityEval",
                "--trainer.callbacks.seed=0",
            ]
        )
    assert "FidelityEval.seed=0 is the calibration's data.seed" in capsys.readouterr().err
    assert not (tmp_path / "run" / "pruned").exists()


def test_a_run_reports_fidelity_with_no_data_folder_and_no_hub(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("BESA_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("BESA_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "run"
    run_cli(
        [
            *fit_args(tiny_model_dir("llama"), "self", root, "--model.method", "magnitude"),
            "--trainer.callbacks+=besa_pl.callbacks.FidelityEval",
            "--trainer.callbacks.nsamples=2",
            "--trainer.callbacks.seqlen=16",
        ]
    )
    found = json.loads((root / "results.json").read_text())["fidelity"]
    assert found["kl"] > 0 and 0 <= found["top1_agreement"] <= 1
    assert found["texts"] == 2 and found["seqlen"] == 16 and found["positions"] == 2 * 15
    # Redirected output (not a terminal) gets one line per stage, so a log is never silent for minutes.
    err = capsys.readouterr().err
    for line in (
        "calibration text: the model writes 4 samples of 32 tokens",
        "calibration text: 4/4 samples",
        "capture: what block 0 receives for 4 samples of 32 tokens",
        "fidelity text: 2/2 samples",
        "evaluation: fidelity to the dense model on 2 texts of 16 tokens",
        "fidelity to the dense model",
    ):
        assert line in err, line
