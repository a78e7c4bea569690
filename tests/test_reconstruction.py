"""The closed-form weight reconstruction (OBS under given masks), and that BESA really learns."""

import pytest
import torch
from torch import nn

from besa_pl.besa.block import BESABlock
from besa_pl.besa.loss import reconstruction_loss
from besa_pl.closedform.mask_swaps import swap_refine
from besa_pl.closedform.masked_solve import masked_least_squares
from besa_pl.closedform.obs import (
    CountSelect,
    LayerBudgetSelect,
    QuantGrid,
    RowBudgetSelect,
    least_squares_start,
    obs_sweep,
)
from besa_pl.closedform.reconstruction import reconstruct_block, sequential_groups
from besa_pl.models.activations import run_block
from besa_pl.models.loading import prunable_linears
from besa_pl.oneshot.importance import InputStatistics, importance_scores
from besa_pl.quant.quantizer import apply_params
from besa_pl.settings import PruneSettings

from .conftest import fit_args, run_cli, saved_weights


def correlated_inputs(n=1024, c=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g) @ torch.randn(c, c, generator=g)  # where OBS pays off


def gram(x):
    return x.t() @ x / x.shape[0]


def column_by_column_obs(weight, hessian, keep, percdamp=0.01):
    """SparseGPT's update written out one column at a time (no lazy batches), in float64."""
    h = hessian.double() + percdamp * torch.diag(hessian).double().mean() * torch.eye(hessian.shape[0])
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    w = weight.double().clone()
    for j in range(w.shape[1]):
        error = w[:, j] * ~keep[:, j] / hinv[j, j]
        w[:, j] *= keep[:, j]
        w[:, j + 1 :] -= error.unsqueeze(1) * hinv[j, j + 1 :].unsqueeze(0)
    return w


def test_obs_under_a_given_mask_is_sparsegpts_update_and_keeps_the_mask():
    x = correlated_inputs()
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    keep = torch.rand(16, 64, generator=torch.Generator().manual_seed(2)) > 0.5
    new, kept, params = obs_sweep(weight, gram(x), keep=keep)
    assert params is None and torch.equal(kept, keep)
    assert torch.all(new[~keep] == 0)  # pruned entries exactly zero: the mask (and sparsity) is unchanged
    expected = column_by_column_obs(weight, gram(x), keep)
    assert torch.allclose(new.double(), expected, rtol=1e-3, atol=1e-3)  # lazy batches change nothing
    masked_error = (x @ (weight * keep - weight).t()).pow(2).mean()
    obs_error = (x @ (new - weight).t()).pow(2).mean()
    assert obs_error < 0.85 * masked_error


@pytest.mark.parametrize("group_size", [None, 16])
def test_joint_quantization_puts_every_kept_weight_on_its_grid(group_size):
    x = correlated_inputs()
    weight = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
    keep = torch.rand(8, 64, generator=torch.Generator().manual_seed(4)) > 0.5
    new, kept, (scale, zero) = obs_sweep(weight, gram(x), keep=keep, grid=QuantGrid(4, group_size))
    assert torch.all(new[~keep] == 0)
    on_grid = apply_params(new, 4, group_size, scale, zero) * keep
    assert torch.equal(on_grid, new)
    levels = new.reshape(8, -1, group_size or 64)
    assert all(len(torch.unique(g)) <= 16 + 1 for g in levels.reshape(-1, group_size or 64))


def test_count_select_keeps_each_rows_count_per_column_block_and_picks_by_saliency():
    x = correlated_inputs(c=256)
    weight = torch.randn(12, 256, generator=torch.Generator().manual_seed(5))
    keep = torch.rand(12, 256, generator=torch.Generator().manual_seed(6)) > torch.linspace(0.2, 0.8, 12).view(-1, 1)
    new, chosen, _ = obs_sweep(weight, gram(x), select=CountSelect(keep))
    for start in (0, 128):
        assert torch.equal((~chosen[:, start : start + 128]).sum(1), (~keep[:, start : start + 128]).sum(1))
    assert torch.all(new[~chosen] == 0)
    fixed, _, _ = obs_sweep(weight, gram(x), keep=keep)
    error = lambda w: (x @ (w - weight).t()).pow(2).mean()  # noqa: E731
    assert error(new) < error(fixed)  # choosing where to prune during the sweep does better


def test_row_and_layer_budgets_keep_their_counts_and_move_them_between_column_blocks():
    x = correlated_inputs(c=256)
    weight = torch.randn(12, 256, generator=torch.Generator().manual_seed(5))
    skew = torch.cat([torch.full((128,), 0.8), torch.full((128,), 0.2)])  # the mask prunes the first block most
    keep = torch.rand(12, 256, generator=torch.Generator().manual_seed(6)) > skew
    _, by_block, _ = obs_sweep(weight, gram(x), select=CountSelect(keep))
    _, by_row, _ = obs_sweep(weight, gram(x), select=RowBudgetSelect(keep))
    _, by_layer, _ = obs_sweep(weight, gram(x), select=LayerBudgetSelect(keep))
    assert torch.equal((~by_row).sum(1), (~keep).sum(1))  # each row's count holds
    assert int((~by_layer).sum()) == int((~keep).sum())  # the layer's count holds
    first = lambda kept: int((~kept[:, :128]).sum())  # noqa: E731
    assert first(by_block) == first(keep) and first(by_row) != first(keep) and first(by_layer) != first(keep)


def test_least_squares_start_maps_pruned_path_inputs_to_the_reference_outputs():
    g = torch.Generator().manual_seed(7)
    reference = correlated_inputs(seed=8)
    mixing = torch.eye(64) + 0.1 * torch.randn(64, 64, generator=g)
    drifted = reference @ mixing  # inputs after earlier pruning: a drift a linear layer can undo
    weight = torch.randn(10, 64, generator=g)
    start = least_squares_start(weight, gram(drifted), reference.t() @ drifted / drifted.shape[0], percdamp=1e-6)
    target = reference @ weight.t()
    error = lambda w: (drifted @ w.t() - target).pow(2).mean()  # noqa: E731
    best = torch.linalg.lstsq(drifted.double(), target.double()).solution.t().float()
    assert error(start) < 0.01 * error(weight)
    assert error(start) <= error(best) + 1e-3 * error(weight)  # the least-squares optimum


def test_masked_least_squares_is_the_optimum_for_the_mask_and_beats_the_sweep():
    x = correlated_inputs()
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(10))
    keep = torch.rand(16, 64, generator=torch.Generator().manual_seed(11)) > 0.5
    swept, _, _ = obs_sweep(weight, gram(x), keep=keep)
    solved = masked_least_squares(swept, weight, gram(x), keep, iterations=200)
    assert torch.all(solved[~keep] == 0)  # the mask, and so the sparsity, is unchanged
    h = gram(x).double()
    h += 0.01 * torch.diag(h).mean() * torch.eye(64, dtype=torch.float64)
    for row in range(16):  # each row's kept weights: the closed-form optimum H_KK^-1 (H w0)_K
        kept = keep[row]
        best = torch.linalg.solve(h[kept][:, kept], (h @ weight[row].double())[kept])
        assert torch.allclose(solved[row, kept].double(), best, rtol=1e-3, atol=1e-3)
    error = lambda w: (x @ (w - weight).t()).pow(2).mean()  # noqa: E731
    assert error(solved) < 0.95 * error(swept)  # the sweep leaves error the mask does not force


def test_swaps_keep_every_rows_count_and_lower_the_error_of_the_exact_solve():
    x = correlated_inputs()
    h = gram(x)
    h[:, 5] = h[5, :] = 0  # an input that is never active: its weights take no part in swaps
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(13))
    swept, keep, _ = obs_sweep(
        weight, h, select=RowBudgetSelect(torch.rand(16, 64, generator=torch.Generator().manual_seed(14)) > 0.5)
    )
    solved = masked_least_squares(swept, weight, h, keep, iterations=200)
    refined, new_keep = swap_refine(solved, weight, h, keep, rounds=10)
    assert torch.equal(new_keep.sum(dim=1), keep.sum(dim=1))  # each row's count, so the exact sparsity
    assert torch.equal(new_keep[:, 5], keep[:, 5])
    assert not torch.equal(new_keep, keep)  # the sweep's greedy choice is improvable here
    assert torch.all(refined[~new_keep] == 0)
    damped = h + 0.01 * torch.diag(h).mean() * torch.eye(64)
    objective = lambda w: (((w - weight) @ damped) * (w - weight)).sum(dim=1)  # noqa: E731
    assert torch.all(objective(refined) <= objective(solved) * (1 + 1e-5))  # no row gets worse
    assert objective(refined).sum() < 0.97 * objective(solved).sum()


def test_swap_rounds_stop_once_a_round_gains_less_than_the_tolerance():
    x = correlated_inputs()
    h = gram(x)
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(13))
    swept, keep, _ = obs_sweep(
        weight, h, select=RowBudgetSelect(torch.rand(16, 64, generator=torch.Generator().manual_seed(14)) > 0.5)
    )
    solved = masked_least_squares(swept, weight, h, keep, iterations=200)
    damped = h + 0.01 * torch.diag(h).mean() * torch.eye(64)
    objective = lambda w: float((((w - weight) @ damped) * (w - weight)).sum())  # noqa: E731
    one_round = swap_refine(solved, weight, h, keep, rounds=1, tolerance=0.0)
    # Any gain is below a tolerance of 100%: the rounds stop after the first.
    assert torch.equal(swap_refine(solved, weight, h, keep, rounds=10, tolerance=1.0)[1], one_round[1])
    every_round = swap_refine(solved, weight, h, keep, rounds=10, tolerance=0.0)
    default = swap_refine(solved, weight, h, keep, rounds=10)
    assert objective(every_round[0]) < objective(one_round[0])  # later rounds do gain here
    assert objective(default[0]) <= objective(every_round[0]) * (1 + 1e-2)


def test_true_sequential_groups_follow_the_blocks_call_order(tiny_block):
    block, inputs, kwargs = tiny_block
    assert sequential_groups(block, inputs[:1], kwargs) == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]


def under_masks(reference: str, exact: bool, swaps: int, percdamp: float = 0.01) -> PruneSettings:
    """The reconstruction under given masks (`--model.reconstruct obs`), with these settings."""
    return PruneSettings(
        reconstruct="obs",
        reconstruct_reference=reference,
        reconstruct_solve="exact" if exact else "sweep",
        reconstruct_swaps=swaps,
        percdamp=percdamp,
    )


@pytest.mark.parametrize(
    "reference, exact, swaps", [("layer", False, 0), ("target", False, 0), ("layer", True, 0), ("layer", True, 10)]
)
def test_block_reconstruction_lowers_the_block_output_error(reference, exact, swaps, tiny_block):
    block, inputs, kwargs = tiny_block
    linears = prunable_linears(block)
    dense = {name: linear.weight.detach().clone() for name, linear in linears.items()}
    target = run_block(block, inputs, kwargs, "cpu")
    g = torch.Generator().manual_seed(9)
    masks = {name: torch.rand(w.shape, generator=g) > 0.5 for name, w in dense.items()}
    try:
        with torch.no_grad():
            for name, linear in linears.items():
                linear.weight.copy_(dense[name] * masks[name])
        masked_error = reconstruction_loss(run_block(block, inputs, kwargs, "cpu"), target)
        final = dict(masks)
        reconstruct_block(block, dense, final, inputs, None, kwargs, "cpu", under_masks(reference, exact, swaps))
        rebuilt_error = reconstruction_loss(run_block(block, inputs, kwargs, "cpu"), target)
        assert rebuilt_error < 0.9 * masked_error
        for name, linear in linears.items():
            assert torch.equal(linear.weight != 0, final[name])
            assert torch.equal(final[name].sum(dim=1), masks[name].sum(dim=1))  # every row's count holds
            assert torch.equal(final[name], masks[name]) or swaps  # only swaps move a weight in or out
    finally:
        with torch.no_grad():
            for name, linear in linears.items():
                linear.weight.copy_(dense[name])


def test_heavier_damping_keeps_the_kept_weights_closer_to_their_dense_values(tiny_block):
    block, inputs, kwargs = tiny_block
    linears = prunable_linears(block)
    dense = {name: linear.weight.detach().clone() for name, linear in linears.items()}
    g = torch.Generator().manual_seed(21)
    masks = {name: torch.rand(w.shape, generator=g) > 0.5 for name, w in dense.items()}
    moved = {}
    try:
        for percdamp in (0.01, 1.0, 1e4):
            final = dict(masks)
            reconstruct_block(
                block, dense, final, inputs, None, kwargs, "cpu", under_masks("layer", True, 10, percdamp)
            )
            moved[percdamp] = sum(
                float((linear.weight - dense[name] * final[name]).norm() / dense[name].norm())
                for name, linear in linears.items()
            )
    finally:
        with torch.no_grad():
            for name, linear in linears.items():
                linear.weight.copy_(dense[name])
    assert moved[0.01] > moved[1.0] > moved[1e4]
    assert moved[1e4] < 1e-2 * moved[0.01]  # lambda >> the Gram: the masked dense weights, not reconstructed


@pytest.mark.parametrize("swaps", [0, 10])
def test_exact_solve_with_joint_quantization_puts_every_kept_weight_on_its_grid(swaps, tiny_block):
    block, inputs, kwargs = tiny_block
    linears = prunable_linears(block)
    dense = {name: linear.weight.detach().clone() for name, linear in linears.items()}
    g = torch.Generator().manual_seed(12)
    masks = {name: torch.rand(w.shape, generator=g) > 0.5 for name, w in dense.items()}
    grids = {name: QuantGrid(4, None) for name in linears}
    try:
        final = dict(masks)
        qparams = reconstruct_block(
            block, dense, final, inputs, None, kwargs, "cpu", under_masks("layer", True, swaps), grids
        )
        for name, linear in linears.items():
            weight = linear.weight.detach()
            assert torch.all(weight[~final[name]] == 0)
            assert torch.equal(final[name].sum(dim=1), masks[name].sum(dim=1))
            assert torch.equal(apply_params(weight, 4, None, *qparams[name]) * final[name], weight)
    finally:
        with torch.no_grad():
            for name, linear in linears.items():
                linear.weight.copy_(dense[name])


def reference_and_scores(block, inputs, kwargs):
    """The dense block's outputs, every linear's Wanda scores and dense weights (to restore them)."""
    linears = prunable_linears(block)
    stats = {name: InputStatistics(linear) for name, linear in linears.items()}
    target = run_block(block, inputs, kwargs, "cpu")
    for stat in stats.values():
        stat.remove()
    scores = {name: importance_scores("wanda", linears[name].weight, stats[name]) for name in linears}
    dense = {name: linear.weight.detach().clone() for name, linear in linears.items()}
    return linears, target, scores, dense


def train_a_few_epochs(besa, inputs, target, epochs: int = 6) -> tuple[float, float]:
    """The block's output error before and after `epochs` passes of one sample per step."""
    with torch.no_grad():
        initial = float(reconstruction_loss(besa(inputs), target))
    (optimizer,) = besa.configure_optimizers()
    for _ in range(epochs):
        for i in range(inputs.shape[0]):
            optimizer.zero_grad()
            besa.training_step((inputs[i : i + 1], target[i : i + 1])).backward()
            optimizer.step()
    with torch.no_grad():
        return initial, float(reconstruction_loss(besa(inputs), target))


def test_besa_learns_better_masks_than_its_uniform_start(tiny_block):
    """Fails if BESA stops learning: after training, the block's output error is lower than with the
    initial masks (every row at the target: per-row Wanda) and the rates have moved off uniform."""
    block, inputs, kwargs = tiny_block
    linears, target, scores, dense = reference_and_scores(block, inputs, kwargs)
    besa = BESABlock(block, kwargs, scores, PruneSettings(d_coef=20.0, smoothing_scale=3.0))
    try:
        initial, learned = train_a_few_epochs(besa, inputs, target)
        rates = besa.learned_rates()
        assert learned < initial
        assert any(float((r - 0.5).abs().max()) > 0.02 for r in rates.values())
        assert abs(float(besa.expected_sparsity()) - 0.5) < 0.01
    finally:
        for name, linear in linears.items():
            nn.utils.parametrize.remove_parametrizations(linear, "weight", leave_parametrized=False)
            with torch.no_grad():
                linear.weight.copy_(dense[name])


@pytest.mark.parametrize("mode", ["obs", "obs_select"])
def test_fit_with_reconstruction_reaches_the_target_exactly(mode, tiny_model_dir, calibration_text, tmp_path):
    run_cli(fit_args(tiny_model_dir("llama"), calibration_text, tmp_path, "--model.reconstruct", mode))
    weights = saved_weights(tmp_path / "pruned")
    for index in range(3):
        linears = [w for name, w in weights.items() if f"layers.{index}." in name and name.endswith("proj.weight")]
        zeros = sum(int((w == 0).sum()) for w in linears)
        assert zeros == round(0.5 * sum(w.numel() for w in linears))
