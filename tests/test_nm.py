"""N:M structure on the default path: BESA's learned channel scales, the closed-form part inside
each group, the exact check, and resume."""

import json

import pytest
import torch
from torch import nn

from besa_pl.besa.block import BESABlock
from besa_pl.besa.channel_scales import ChannelScales
from besa_pl.closedform.mask_swaps import swap_refine
from besa_pl.closedform.masked_solve import masked_least_squares
from besa_pl.closedform.obs import GroupSelect, obs_sweep
from besa_pl.errors import BesaError
from besa_pl.loop.nm_check import groups_over_n
from besa_pl.settings import PruneSettings

from .conftest import fit_args, run_cli, saved_weights
from .test_reconstruction import correlated_inputs, gram, reference_and_scores, train_a_few_epochs
from .test_resume import interrupt_config


def kept_per_group(weight, m):
    return (weight != 0).reshape(weight.shape[0], -1, m).sum(dim=-1)


@pytest.mark.parametrize("structure", ["2:4", "4:8"])
def test_the_default_path_keeps_at_most_n_of_every_m(structure, tiny_model_dir, calibration_text, tmp_path):
    """BESA's channel scales + their masks kept + exact solve + swaps (the defaults), every written linear checked."""
    run_cli(fit_args(tiny_model_dir("llama"), calibration_text, tmp_path, "--model.structure", structure))
    n, m = map(int, structure.split(":"))
    weights = saved_weights(tmp_path / "pruned")
    linears = [w for name, w in weights.items() if "layers" in name and name.endswith("proj.weight")]
    assert len(linears) == 21
    for weight in linears:
        assert int(kept_per_group(weight, m).max()) <= n
    report = json.loads((tmp_path / "sparsity.json").read_text())
    assert report["n_of_m"] == {"n": n, "m": m, "groups": sum(w.numel() // m for w in linears), "groups_over_n": 0}
    assert set(report["learned_scales"]) == {"0", "1", "2"}
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["variant"].startswith(f"BESA {structure} (learned channel scales) + OBS update under its masks")
    assert results["target_sparsity"] == pytest.approx(1 - n / m)


def test_the_check_counts_groups_over_n():
    weight = torch.tensor([[1.0, 0, 2, 0, 3, 4, 5, 0]])
    assert groups_over_n(weight, 2, 4) == 1
    assert groups_over_n(weight, 3, 4) == 0


def test_channel_scales_start_as_the_one_shot_ranking_and_keep_n_of_m():
    scores = torch.rand(6, 16, generator=torch.Generator().manual_seed(0))
    scales = ChannelScales(scores, 2, 4)
    keep = scales.hard_mask()
    expected = torch.zeros(6, 4, 4, dtype=torch.bool).scatter_(-1, scores.view(6, 4, 4).topk(2, dim=-1).indices, True)
    assert torch.equal(keep, expected.view(6, 16))
    with torch.no_grad():
        scales.log_scale[0] = 50.0  # a large scale keeps its column in every row
    assert bool(scales.hard_mask()[:, 0].all()) and torch.all(kept_per_group(scales.hard_mask().float(), 4) == 2)
    weight = torch.randn(6, 16)
    assert torch.equal(scales(weight), weight * scales.hard_mask())  # forward: exactly the hard mask


def test_channel_scales_get_the_soft_masks_gradient():
    """Straight-through: d loss / d log_scale_j = sum_r dL/dM_rj * sigmoid'((z - tau) / T) / T."""
    scores = torch.rand(3, 8, generator=torch.Generator().manual_seed(1)) + 0.1
    scales = ChannelScales(scores, 2, 4, temperature=0.5)
    weight = torch.randn(3, 8, generator=torch.Generator().manual_seed(2))
    upstream = torch.randn(3, 8, generator=torch.Generator().manual_seed(3))
    (scales(weight) * upstream).sum().backward()
    z = scores.log().view(3, 2, 4)
    top = z.topk(3, dim=-1).values
    tau = (top[..., 1:2] + top[..., 2:3]) / 2
    s = torch.sigmoid((z - tau) / 0.5)
    expected = ((upstream * weight).view(3, 2, 4) * s * (1 - s) / 0.5).sum(dim=0).reshape(-1)
    assert torch.allclose(scales.log_scale.grad, expected, atol=1e-6)


def test_learned_scales_move_and_lower_the_blocks_error_against_their_initial_masks(tiny_block):
    """Fails if the N:M learned part stops learning: trained on the block's reconstruction loss, the
    scales leave 0 and the block's output error falls below that of the initial (Wanda 2:4) masks."""
    block, inputs, kwargs = tiny_block
    linears, target, scores, dense = reference_and_scores(block, inputs, kwargs)
    besa = BESABlock(block, kwargs, scores, PruneSettings(structure="2:4"))
    try:
        initial_masks = {name: besa.allocation(name).hard_mask() for name in linears}
        initial, learned = train_a_few_epochs(besa, inputs, target)
        assert learned < initial
        assert any(float(besa.allocation(name).log_scale.detach().abs().max()) > 0.01 for name in linears)
        assert any(not torch.equal(besa.allocation(name).hard_mask(), initial_masks[name]) for name in linears)
        assert float(besa.expected_sparsity()) == pytest.approx(0.5)
        masks, _ = besa.finalize()
        for name, mask in masks.items():
            assert torch.all(kept_per_group(mask.float(), 4) == 2), name
    finally:
        for name, linear in linears.items():
            if nn.utils.parametrize.is_parametrized(linear):
                nn.utils.parametrize.remove_parametrizations(linear, "weight", leave_parametrized=False)
            with torch.no_grad():
                linear.weight.copy_(dense[name])


def test_group_select_keeps_n_of_m_and_follows_the_column_weights():
    x = correlated_inputs(c=32)
    weight = torch.randn(8, 32, generator=torch.Generator().manual_seed(4))
    _, keep, _ = obs_sweep(weight, gram(x), select=GroupSelect(2, 4))
    assert torch.all(kept_per_group(keep.float(), 4) == 2)
    favoured = torch.ones(32)
    favoured[5] = 1e6  # column 5 wins its group in every row
    _, keep_weighted, _ = obs_sweep(weight, gram(x), select=GroupSelect(2, 4, favoured))
    assert bool(keep_weighted[:, 5].all()) and torch.all(kept_per_group(keep_weighted.float(), 4) == 2)


def test_group_select_decides_groups_whole_when_m_does_not_divide_the_lazy_block():
    x = correlated_inputs(n=512, c=42)
    weight = torch.randn(4, 42, generator=torch.Generator().manual_seed(5))
    _, keep, _ = obs_sweep(weight, gram(x), select=GroupSelect(3, 7), blocksize=16)
    assert torch.all(kept_per_group(keep.float(), 7) == 3)


def objective(w, start, h):
    return float(((w - start) @ h * (w - start)).sum())


def test_swaps_inside_groups_keep_every_groups_count_and_lower_the_error():
    x = correlated_inputs()
    h = gram(x)
    start = torch.randn(16, 64, generator=torch.Generator().manual_seed(6))
    _, keep, _ = obs_sweep(start, h, select=GroupSelect(2, 4))
    solved = masked_least_squares(start, start, h, keep)
    swapped, new_keep = swap_refine(solved, start, h, keep, rounds=10, group=4)
    assert torch.all(kept_per_group(new_keep.float(), 4) == 2)
    assert torch.all(swapped[~new_keep] == 0)
    assert not torch.equal(new_keep, keep)
    damped = h + 0.01 * torch.diag(h).mean() * torch.eye(64)
    assert objective(swapped, start, damped) < objective(solved, start, damped)


def test_n_of_m_refuses_per_row_counts():
    with pytest.raises(BesaError, match="model.reconstruct=obs_row: per-row or per-layer counts break"):
        PruneSettings(structure="2:4", reconstruct="obs_row")


def test_resume_with_n_of_m_is_bit_identical(tiny_model_dir, calibration_text, tmp_path, capsys):
    reference_root, resumed_root = tmp_path / "whole", tmp_path / "resumed"
    run_cli(fit_args(tiny_model_dir("llama"), calibration_text, reference_root, "--model.structure", "2:4"))
    args = fit_args(tiny_model_dir("llama"), calibration_text, resumed_root, "--model.structure", "2:4")
    with pytest.raises(SystemExit):
        run_cli(["fit", "--config", interrupt_config(tmp_path, 1, 2), *args[1:]])
    run_cli(args + ["--ckpt_path", "last"])
    assert "resuming at block 2/3 (a checkpoint taken 2 steps into it)" in " ".join(capsys.readouterr().err.split())
    reference, resumed = saved_weights(reference_root / "pruned"), saved_weights(resumed_root / "pruned")
    assert reference.keys() == resumed.keys()
    for name, tensor in reference.items():
        assert torch.equal(resumed[name], tensor), name


def test_n_of_m_with_joint_quantization_keeps_the_groups(tiny_model_dir, calibration_text, tmp_path):
    """BESA's channel scales on top of the learnable-clipping quantizer: the 4-bit weights still keep
    at most 2 of every 4."""
    extra = ("--model.structure", "2:4", "--model.quant.bits", "4", "--model.quant.group_size", "32")
    run_cli(fit_args(tiny_model_dir("llama"), calibration_text, tmp_path, *extra))
    weights = saved_weights(tmp_path / "pruned")
    for name, weight in weights.items():
        if "layers" in name and name.endswith("proj.weight"):
            assert int(kept_per_group(weight, 4).max()) <= 2, name
            assert weight.unique().numel() > 16  # quantized per group and row, not one 16-level grid
    assert json.loads((tmp_path / "sparsity.json").read_text())["n_of_m"]["groups_over_n"] == 0
