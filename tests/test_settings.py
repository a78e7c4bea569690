"""Every setting the README advertises runs a fit to the target, and changes the result."""

import json

import pytest
import torch

from .conftest import fit_args, run_cli, saved_weights

ADVERTISED = [
    ["--model.target_mode", "dense_trajectory"],
    ["--model.granularity", "layer"],
    ["--model.optimizer", "adamw", "--model.lr", "0.05"],
    ["--model.smoothing", "false"],
    ["--model.smoothing_scale", "4"],
    ["--model.penalty_form", "absolute", "--model.penalty_weight", "20"],
    ["--model.importance", "sparsegpt"],
    ["--model.importance", "magnitude"],
    ["--model.activation_dtype", "bfloat16"],
    ["--model.reconstruct", "obs"],
    ["--model.reconstruct", "obs", "--model.reconstruct_reference", "layer"],
    ["--model.reconstruct", "obs_select"],
    ["--data.batch_size", "2"],
    ["--model.epochs_per_block", "2"],
]


@pytest.fixture(scope="module")
def default_weights(tiny_model_dir, calibration_text, tmp_path_factory):
    root = tmp_path_factory.mktemp("default")
    run_cli(fit_args(tiny_model_dir("llama"), calibration_text, root))
    return saved_weights(root / "pruned")


@pytest.mark.parametrize("extra", ADVERTISED, ids=[" ".join(e) for e in ADVERTISED])
def test_setting_fits_to_the_target_and_changes_the_result(extra, default_weights, tiny_model_dir, calibration_text,
                                                            tmp_path):
    run_cli(fit_args(tiny_model_dir("llama"), calibration_text, tmp_path, *extra))
    report = json.loads((tmp_path / "sparsity.json").read_text())
    assert report["overall"] == pytest.approx(0.5, abs=1e-3)
    assert set(report["learned_rates"]) == {"0", "1", "2"}
    weights = saved_weights(tmp_path / "pruned")
    assert any(not torch.equal(weights[name], default_weights[name]) for name in default_weights)
    if "layer" in extra and "--model.granularity" in extra:
        for block in report["learned_rates"].values():
            assert all(rates["min"] == rates["max"] for rates in block.values())  # one rate per layer
