"""Every setting the README advertises runs a fit to the target, and changes the result."""

import json

import pytest
import torch

from .conftest import fit_args, run_cli, saved_weights

# Prodigy's step size starts at d0 = 1e-6 and grows only over hundreds of steps: on 4 samples its rates move
# by 1e-6 and ties decide the masks. Every run here learns with AdamW steps instead, so the rates move
# (by about 0.01) and each setting's effect on the allocation shows.
LEARNING = ["--model.optimizer", "adamw", "--model.lr", "0.05"]

ADVERTISED = [
    ["--model.target_mode", "dense_trajectory"],
    ["--model.granularity", "layer"],
    ["--model.optimizer", "prodigy"],
    ["--model.smoothing", "false"],
    ["--model.smoothing_scale", "4"],
    ["--model.penalty_form", "absolute"],  # (at 50%, relative with weight 5 equals absolute with weight 20)
    ["--model.importance", "sparsegpt"],
    ["--model.importance", "magnitude"],
    ["--model.activation_dtype", "bfloat16"],
    ["--model.reconstruct", "none"],
    ["--model.reconstruct", "obs"],
    # obs_row is obs_select on a model this narrow (one 128-column block): test_reconstruction covers it
    ["--model.reconstruct", "obs_layer"],
    ["--model.reconstruct_reference", "target"],
    ["--model.reconstruct_solve", "sweep"],
    ["--model.reconstruct_swaps", "0"],
    ["--model.percdamp", "1"],
    ["--data.batch_size", "2"],
    ["--model.epochs_per_block", "2"],
]


@pytest.fixture(scope="module")
def default_weights(tiny_model_dir, calibration_text, tmp_path_factory):
    root = tmp_path_factory.mktemp("default")
    run_cli(fit_args(tiny_model_dir("llama"), calibration_text, root, *LEARNING))
    return saved_weights(root / "pruned")


@pytest.mark.parametrize("extra", ADVERTISED, ids=[" ".join(e) for e in ADVERTISED])
def test_setting_fits_to_the_target_and_changes_the_result(
    extra, default_weights, tiny_model_dir, calibration_text, tmp_path
):
    run_cli(fit_args(tiny_model_dir("llama"), calibration_text, tmp_path, *LEARNING, *extra))
    report = json.loads((tmp_path / "sparsity.json").read_text())
    assert report["overall"] == pytest.approx(0.5, abs=1e-3)
    assert set(report["learned_rates"]) == {"0", "1", "2"}
    weights = saved_weights(tmp_path / "pruned")
    assert any(not torch.equal(weights[name], default_weights[name]) for name in default_weights)
    if "layer" in extra and "--model.granularity" in extra:
        for block in report["learned_rates"].values():
            assert all(rates["min"] == rates["max"] for rates in block.values())  # one rate per layer


def test_results_name_the_variant_and_a_damping_other_than_the_methods_own():
    from besa_pl.settings import PruneSettings

    default = PruneSettings().variant()
    assert (
        default.startswith("BESA + SparseGPT's sweep") and "10 rounds of swaps" in default and "percdamp" not in default
    )
    assert PruneSettings(percdamp=0.01).variant() == default + ", percdamp 0.01"
    assert PruneSettings(method="sparsegpt", percdamp=0.1).variant() == "SparseGPT, percdamp 0.1"
    assert PruneSettings(method="wanda", percdamp=0.1).variant() == "Wanda"  # no OBS step: the damping plays no part
    assert PruneSettings(reconstruct="none").variant() == "BESA (the paper's: no reconstruction)"


def test_the_damping_is_sparsegpts_except_for_the_reconstruction_up_to_60_percent_sparsity():
    from besa_pl.settings import PruneSettings

    assert PruneSettings(method="sparsegpt").damping == 0.01  # as published
    assert PruneSettings().damping == 0.1 and PruneSettings(method="wanda", reconstruct="obs").damping == 0.1
    assert PruneSettings(sparsity=0.6).damping == 0.1 and PruneSettings(sparsity=0.65).damping == 0.01
    assert PruneSettings(sparsity=0.7).damping == 0.01 and PruneSettings(structure="2:4").damping == 0.1
    assert PruneSettings(sparsity=0.7).variant() == PruneSettings().variant()  # the method's own damping
    assert PruneSettings(method="sparsegpt", percdamp=0.05).damping == 0.05
    # results and checkpoints record the damping that ran, not "auto"
    assert PruneSettings().flat()["model.percdamp"] == 0.1
