"""The evaluation paths a default run does not take on a small machine: the `heldout` perplexity split
(C4 train documents calibration did not draw), bf16 compute, and the evaluation of a model that does not
fit in memory (one block at a time, or accelerate's offloading). All on a tiny model and generated data."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import besa_pl.eval.perplexity as perplexity_module
from besa_pl.data.calibration import CalibrationDataModule, calibration_tokens, documents
from besa_pl.errors import BesaError
from besa_pl.eval.perplexity import C4_WINDOWS, evaluation_text, perplexity, windows
from besa_pl.models.source import ModelSource
from besa_pl.settings import PruneSettings

from .conftest import fit_args, run_cli, saved_weights


def perplexity_config(tmp_path, datasets, data_dir, **extra) -> list[str]:
    init_args = {"datasets": datasets, "seqlen": 64, "max_windows": 4, "data_dir": str(data_dir), **extra}
    path = tmp_path / "perplexity.yaml"
    path.write_text(
        "trainer:\n  callbacks:\n    - class_path: besa_pl.callbacks.PerplexityEval\n"
        f"      init_args: {json.dumps(init_args)}\n"
    )
    return ["--config", str(path)]


def _contains(ids: torch.Tensor, window: torch.Tensor) -> bool:
    n = window.numel()
    return any(torch.equal(ids[i : i + n], window) for i in range(ids.numel() - n + 1))


# ---------------------------------------------------------------- heldout: C4 train documents not drawn


def test_heldout_is_the_c4_train_documents_calibration_did_not_draw(tiny_model_dir, tiny_data_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("llama"))
    docs, source = documents("c4", "train", str(tiny_data_dir))
    data = CalibrationDataModule(dataset="c4", nsamples=8, seqlen=32, seed=0, data_dir=str(tiny_data_dir))
    text, described = data.heldout_text(tokenizer)
    used = data.used_documents
    # The documents drawn are exactly those the calibration windows come from (the same seeded draw).
    again: set[int] = set()
    tokens, _ = calibration_tokens("c4", tokenizer, 8, 32, 0, str(tiny_data_dir), again)
    assert again == used and 0 < len(used) <= 8
    for window in tokens:
        assert any(_contains(tokenizer(docs[i], return_tensors="pt").input_ids[0], window) for i in used)
    # Held out: every other document, in order, joined with a space (the C4 protocol's join).
    kept = [doc for index, doc in enumerate(docs) if index not in used]
    assert text == " ".join(kept)
    assert len(kept) == len(docs) - len(used)
    for index in used:
        assert docs[index] not in text  # no calibration document is scored
    assert described == f"{source} without the {len(used)} calibration documents"
    # Another seed draws other documents, and holds out others.
    other = CalibrationDataModule(dataset="c4", nsamples=8, seqlen=32, seed=1, data_dir=str(tiny_data_dir))
    assert other.heldout_text(tokenizer)[0] != text and other.used_documents != used


def test_heldout_needs_c4_calibration():
    data = CalibrationDataModule(dataset="self", nsamples=4, seqlen=32)
    with pytest.raises(BesaError) as error:
        evaluation_text("heldout", None, data, None)
    assert (
        str(error.value) == "PerplexityEval.datasets: heldout needs data.dataset c4 (documents to hold out), not self"
    )


def test_a_fit_scores_heldout_without_the_documents_it_calibrated_on(tiny_model_dir, tiny_data_dir, tmp_path):
    args = fit_args(
        tiny_model_dir("llama"),
        "c4",
        tmp_path / "run",
        "--model.method",
        "wanda",
        "--data.data_dir",
        str(tiny_data_dir),
        "--data.nsamples",
        "8",
    )
    run_cli(["fit", *perplexity_config(tmp_path, ["heldout", "c4"], tiny_data_dir, max_windows=None), *args[1:]])
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    details = results["perplexity_details"]["heldout"]
    # The same documents as a fresh draw with the run's data settings: the fit reused its own draw.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("llama"))
    data = CalibrationDataModule(dataset="c4", nsamples=8, seqlen=32, seed=0, data_dir=str(tiny_data_dir))
    text, described = data.heldout_text(tokenizer)
    assert details["source"] == described
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    batches = windows(ids, 64, C4_WINDOWS)
    assert details["tokens"] == ids.numel() and details["windows"] == batches.shape[0] > 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "pruned").eval()
    assert results["perplexity"]["heldout"] == pytest.approx(perplexity(model, batches), rel=1e-5)
    assert results["perplexity"]["heldout"] != results["perplexity"]["c4"]  # another text than C4 validation


def test_heldout_after_self_calibration_is_reported_skipped_with_the_reason(
    tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("BESA_CACHE", str(tmp_path / "cache"))
    args = fit_args(tiny_model_dir("llama"), "self", tmp_path / "run", "--model.method", "magnitude")
    run_cli(["fit", *perplexity_config(tmp_path, ["heldout", "wikitext2"], tiny_data_dir), *args[1:]])
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["perplexity_skipped"] == {
        "heldout": "PerplexityEval.datasets: heldout needs data.dataset c4 (documents to hold out), not self"
    }
    assert set(results["perplexity"]) == {"wikitext2"}  # the pruning and the other evaluation stand


# ---------------------------------------------------------------- bf16 compute


def test_bf16_compute_on_the_cpu_reaches_exact_counts_with_finite_outputs(
    tiny_model_dir, calibration_text, tiny_data_dir, tmp_path
):
    args = fit_args(tiny_model_dir("llama"), calibration_text, tmp_path / "run", "--model.dtype", "bfloat16")
    run_cli(["fit", *perplexity_config(tmp_path, ["wikitext2"], tiny_data_dir), *args[1:]])
    weights = saved_weights(tmp_path / "run" / "pruned")
    for index in range(3):
        linears = [w for name, w in weights.items() if f"layers.{index}." in name and name.endswith("proj.weight")]
        assert len(linears) == 7 and all(w.dtype == torch.bfloat16 for w in linears)
        zeros = sum(int((w == 0).sum()) for w in linears)
        assert zeros == round(0.5 * sum(w.numel() for w in linears))  # exactly the target, block by block
    assert all(bool(torch.isfinite(w.float()).all()) for w in weights.values())
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["settings"]["dtype"] == "bfloat16" and results["realised_sparsity"] == pytest.approx(0.5, abs=1e-9)
    assert math.isfinite(results["perplexity"]["wikitext2"])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "pruned", dtype=torch.bfloat16).eval()
    tokens = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(tokens, use_cache=False).logits
    assert logits.dtype == torch.bfloat16 and bool(torch.isfinite(logits.float()).all())


# ---------------------------------------------------------------- a model that does not fit: streaming, offloading


@pytest.fixture(scope="module")
def pruned_run(tiny_model_dir, calibration_text, tiny_data_dir, tmp_path_factory):
    """A Wanda fit whose pruned model is evaluated whole (it fits): the reference perplexities."""
    root = tmp_path_factory.mktemp("fits")
    args = fit_args(tiny_model_dir("llama"), calibration_text, root / "run", "--model.method", "wanda")
    run_cli(["fit", *perplexity_config(root, ["wikitext2", "ptb"], tiny_data_dir), *args[1:]])
    return root / "run"


def no_memory(monkeypatch):
    """The device reports almost no free memory: no model fits whole."""
    monkeypatch.setattr("besa_pl.models.source.available_bytes", lambda device: 1)


def test_a_model_that_does_not_fit_is_evaluated_block_by_block_to_the_same_perplexity(
    pruned_run, tiny_data_dir, tmp_path, monkeypatch
):
    reference = json.loads((pruned_run / "results.json").read_text())
    no_memory(monkeypatch)
    streamed = []
    original = perplexity_module.streamed_perplexity
    monkeypatch.setattr(
        perplexity_module, "streamed_perplexity", lambda *a, **k: streamed.append(a[1]) or original(*a, **k)
    )
    whole = []
    monkeypatch.setattr(perplexity_module, "perplexity", lambda *a, **k: whole.append(1))
    # Evaluate the pruned folder as it stands (method dense: no pruning, only the fit-end evaluations).
    args = fit_args(pruned_run / "pruned", "self", tmp_path / "eval", "--model.method", "dense")
    run_cli(["fit", *perplexity_config(tmp_path, ["wikitext2", "ptb"], tiny_data_dir), *args[1:]])
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert not whole and len(streamed) == 2  # both datasets took the block-by-block path
    assert str(streamed[0]) == str(pruned_run / "pruned")
    for name in ("wikitext2", "ptb"):
        assert results["perplexity"][name] == pytest.approx(reference["perplexity"][name], rel=1e-5)
        assert results["perplexity_details"][name]["windows"] == reference["perplexity_details"][name]["windows"]
        assert results["perplexity_details"][name]["window_loss"] == pytest.approx(
            reference["perplexity_details"][name]["window_loss"], rel=1e-5
        )


def test_an_offloaded_evaluation_model_gives_the_logits_of_the_whole_model(pruned_run, monkeypatch):
    folder = pruned_run / "pruned"
    trainer = SimpleNamespace(
        strategy=SimpleNamespace(root_device=torch.device("cpu")), default_root_dir=str(pruned_run)
    )
    tokens = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(3))
    source = ModelSource(str(folder), PruneSettings(method="dense"))
    whole, device = source.evaluation_model(trainer)
    assert whole is not None and device.type == "cpu"
    with torch.no_grad():
        expected = whole(tokens, use_cache=False).logits
    no_memory(monkeypatch)
    source = ModelSource(str(folder), PruneSettings(method="dense"))
    assert source.evaluation_model(trainer) == (None, torch.device("cpu"))  # without offloading: does not fit
    import besa_pl.models.source as source_module

    placed = []
    original = source_module.offloaded_model
    monkeypatch.setattr(source_module, "offloaded_model", lambda *a: placed.append(a[0]) or original(*a))
    offloaded, device = source.evaluation_model(trainer, offload=True)  # what the zero-shot evaluation asks for
    assert placed == [folder] and offloaded is not None  # accelerate placed it (device_map="auto", offload folder)
    assert not any(p.requires_grad for p in offloaded.parameters())
    with torch.no_grad():
        got = offloaded(tokens.to(device), use_cache=False).logits
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-5, atol=1e-5)
