"""Calibration text written by the model itself, and a run that needs no data at all."""

import json

import pytest
import torch

from besa_pl.data.self_calibration import (
    SelfRecipe,
    first_word_ids,
    kv_cache_bytes,
    resolved_batch,
    sample_batch,
    self_calibration_tokens,
)
from besa_pl.models.source import ModelSource
from besa_pl.settings import PruneSettings

from .conftest import fit_args, run_cli


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BESA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def tokens(folder, seed, recipe=SelfRecipe(batch_size=3)):
    return self_calibration_tokens(ModelSource(str(folder), PruneSettings()), 5, 24, seed, recipe, "cpu")[0]


def test_samples_have_the_shape_start_at_bos_and_follow_the_seed(tiny_model_dir, cache):
    from transformers import AutoTokenizer

    folder = tiny_model_dir("llama")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    first = tokens(folder, 0)
    assert first.shape == (5, 24) and first.dtype == torch.long
    assert torch.all(first[:, 0] == tokenizer.bos_token_id)
    assert set(first[:, 1].tolist()) <= set(first_word_ids(tokenizer))  # the first word: a common English one
    for path in (cache / "self-calibration").glob("*.pt"):
        path.unlink()  # written again from scratch: the same seed gives the same text
    assert torch.equal(tokens(folder, 0), first)
    assert not torch.equal(tokens(folder, 1), first)


def test_finished_texts_leave_the_batch_and_the_others_see_their_own_context(tiny_model_dir):
    """With the KV cache and rows dropped as texts end, every next-token distribution drawn from is
    the one the model gives the text's whole prefix (no cache, no batch)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama")).eval()
    eos, bos = 2, 1

    def rule(step, scores):  # EOS made likely, so texts end at different steps
        return scores + 6.0 * (torch.arange(scores.shape[1]) == eos)

    seen = []
    torch.manual_seed(0)
    texts = sample_batch(model, bos, eos, 6, 20, rule, "cpu", lambda alive, logits: seen.append((alive, logits)))
    lengths = sorted(len(text) for text in texts)
    assert lengths[0] < lengths[-1] and lengths[0] < 21  # rows left the batch at different steps
    for text in texts:
        assert text[0] == bos and (text[-1] == eos or len(text) == 21) and eos not in text[1:-1]
    for step, (alive, logits) in enumerate(seen):
        assert sorted(alive.tolist()) == [row for row, text in enumerate(texts) if len(text) > step + 1]
        for row, row_logits in zip(alive.tolist(), logits):
            prefix = torch.tensor([texts[row][: step + 1]])
            full = model(prefix, use_cache=False).logits[0, -1]
            torch.testing.assert_close(row_logits, full, rtol=1e-4, atol=1e-4)


def test_the_automatic_batch_is_the_largest_whose_kv_caches_fit_a_quarter_of_the_free_memory():
    from transformers import LlamaConfig

    config = LlamaConfig(num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, hidden_size=256)
    one = kv_cache_bytes(config, 100, torch.float32)
    assert one == 2 * 4 * 2 * 32 * 100 * 4  # keys and values, 4 layers, 2 KV heads of 32, 100 tokens, fp32
    auto = SelfRecipe()
    assert resolved_batch(auto, config, 1000, 100, torch.float32, 10**12) == 64
    assert resolved_batch(auto, config, 20, 100, torch.float32, 10**12) == 16  # no wider than the texts
    assert resolved_batch(auto, config, 1000, 100, torch.float32, 4 * 8 * one) == 8
    assert resolved_batch(auto, config, 1000, 100, torch.float32, 0) == 1
    assert resolved_batch(SelfRecipe(batch_size=3), config, 1000, 100, torch.float32, 0) == 3


def test_generated_tokens_are_cached_and_reused(tiny_model_dir, cache, monkeypatch):
    folder = tiny_model_dir("llama")
    first = tokens(folder, 0)
    assert len(list((cache / "self-calibration").glob("*.pt"))) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("generated again instead of reading the cache")

    monkeypatch.setattr("besa_pl.data.self_calibration.generate_samples", refuse)
    assert torch.equal(tokens(folder, 0), first)


def test_the_perplexity_filter_keeps_the_most_likely_samples(tiny_model_dir, cache, monkeypatch):
    from transformers import AutoModelForCausalLM

    import besa_pl.data.self_calibration as module

    pool = []
    generate = module.generate_samples
    monkeypatch.setattr(module, "generate_samples", lambda *a, **k: pool.append(generate(*a, **k)) or pool[-1])
    filtered = tokens(tiny_model_dir("llama"), 0, SelfRecipe(batch_size=4, filter_fraction=0.5))
    assert filtered.shape == (5, 24) and pool[0].shape == (10, 24)  # 5 / (1 - 0.5) generated
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama")).eval()
    ppl = module.sample_perplexities(model, pool[0], "cpu", 4)
    kept = [i for i in range(10) if any(torch.equal(pool[0][i], row) for row in filtered)]
    assert len(kept) == 5 and max(ppl[kept]) <= min(ppl[[i for i in range(10) if i not in kept]])


def test_a_run_with_no_data_prunes_and_reports_the_evaluations_it_could_not_run(
    tiny_model_dir, cache, tmp_path, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no hub, and the data folder below is empty
    monkeypatch.delenv("BESA_DATA_DIR", raising=False)
    (tmp_path / "empty").mkdir()
    config = tmp_path / "evals.yaml"
    config.write_text(
        "trainer:\n  callbacks:\n"
        "    - class_path: besa_pl.callbacks.PerplexityEval\n      init_args: {datasets: [wikitext2], seqlen: 128}\n"
        "    - class_path: besa_pl.callbacks.ZeroShotEval\n      init_args: {tasks: [piqa]}\n"
    )
    args = fit_args(tiny_model_dir("llama"), "self", tmp_path / "run", "--data.data_dir", str(tmp_path / "empty"))
    run_cli(["fit", "--config", str(config), *args[1:]])  # returns normally: exit code 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["realised_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert (
        "wikitext2" in results["perplexity_skipped"]
        and "no wikitext2 test split" in results["perplexity_skipped"]["wikitext2"]
    )
    assert "piqa" in results["zero_shot"]["skipped"]


def test_an_unreachable_calibration_source_stops_before_any_pruning(
    tiny_model_dir, cache, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("BESA_DATA_DIR", raising=False)
    with pytest.raises(SystemExit) as stop:
        run_cli(fit_args(tiny_model_dir("llama"), "c4", tmp_path))
    assert stop.value.code == 2
    message = " ".join(capsys.readouterr().err.split())
    assert "data.dataset: the Hugging Face hub cannot be reached" in message
    assert "or calibrate with --data.dataset self" in message  # the way out that needs no data
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "pruned.partial").exists()


def test_an_unreachable_evaluation_source_names_its_setting_and_not_self_calibration(monkeypatch):
    from besa_pl.errors import BesaError
    from besa_pl.eval.perplexity import evaluation_text

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("BESA_DATA_DIR", raising=False)
    with pytest.raises(BesaError) as error:
        evaluation_text("wikitext2", None)
    assert str(error.value).startswith("PerplexityEval.datasets: the Hugging Face hub cannot be reached")
    assert "data.dataset self" not in str(error.value)  # calibrating differently would not help an evaluation


def test_a_wide_batch_reports_its_progress_every_64_steps_in_a_redirected_log(tiny_model_dir, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from besa_pl.data.self_calibration import generate_samples

    folder = tiny_model_dir("llama")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    torch.manual_seed(0)
    samples = generate_samples(model, AutoTokenizer.from_pretrained(folder), 2, 150, SelfRecipe(batch_size=2), "cpu")
    assert samples.shape == (2, 150)
    err = capsys.readouterr().err
    assert "calibration text: " in err and "/300 tokens written" in err  # before the batch is done
    assert "calibration text: 2/2 samples of 150 tokens written" in err
