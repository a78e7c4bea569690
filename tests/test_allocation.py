"""Invariants of the sparsity allocation and its masks (exact counts, straight-through gradient)."""

import math

import pytest
import torch

from besa_pl.besa.allocation import (
    SparsityAllocation,
    candidate_rates,
    gather_by_rank,
    prune_counts,
    rank_space_keep_prob,
    smoothing_band,
    straight_through,
)
from besa_pl.besa.loss import sparsity_penalty
from besa_pl.oneshot.baselines import keep_mask_from_scores
from besa_pl.oneshot.importance import row_ranks, wanda_scores


def random_allocation(rows=12, cols=37, granularity="row", smoothing=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    ranks = row_ranks(torch.rand(rows, cols, generator=g))
    allocation = SparsityAllocation(ranks, candidate_rates(0.5), granularity, smoothing)
    with torch.no_grad():
        allocation.logits.normal_(0, 3, generator=g)
    return allocation


@pytest.mark.parametrize("granularity", ["row", "layer"])
@pytest.mark.parametrize("smoothing", [True, False])
def test_hard_mask_prunes_exactly_floor_c_alpha_lowest_ranked(granularity, smoothing):
    allocation = random_allocation(granularity=granularity, smoothing=smoothing)
    cols = allocation.columns
    alpha = allocation.row_alpha()
    keep = allocation.hard_mask()
    for r in range(keep.shape[0]):
        k = math.floor(cols * float(alpha[r]))
        assert int((~keep[r]).sum()) == k
        pruned_ranks = allocation.ranks[r][~keep[r]]
        assert sorted(pruned_ranks.tolist()) == list(range(k))


def test_ste_forward_value_is_the_hard_mask_bit_for_bit():
    allocation = random_allocation()
    mask = allocation.mask()
    assert torch.equal(mask, allocation.hard_mask().float())
    weight = torch.randn(12, 37)
    assert torch.equal(allocation(weight), weight * allocation.hard_mask())


def test_gradient_wrt_mixture_weights_matches_closed_form():
    rows, cols = 5, 23
    g = torch.Generator().manual_seed(1)
    ranks = row_ranks(torch.rand(rows, cols, generator=g))
    rates = candidate_rates(0.5)
    thresholds = torch.floor(rates.double() * cols).long()
    beta = torch.softmax(torch.randn(rows, rates.numel(), generator=g), dim=-1).requires_grad_(True)
    hard = torch.rand(rows, cols, generator=g) > 0.5
    soft = gather_by_rank(rank_space_keep_prob(beta, thresholds, cols), ranks)
    G = torch.randn(rows, cols, generator=g)
    (G * straight_through(hard, soft)).sum().backward()
    order = torch.argsort(ranks.long(), dim=1)  # pi_r(j): the column of rank j
    expected = torch.zeros(rows, rates.numel())
    for r in range(rows):
        for d, c_d in enumerate(thresholds.tolist()):
            expected[r, d] = -G[r, order[r, :c_d]].sum()
    assert torch.allclose(beta.grad, expected, atol=1e-5)


def test_alpha_is_one_half_at_initialisation():
    ranks = row_ranks(torch.rand(8, 16))
    for smoothing in (True, False):
        for granularity in ("row", "layer"):
            allocation = SparsityAllocation(ranks, candidate_rates(0.5), granularity, smoothing)
            assert torch.allclose(allocation.alpha(), torch.full_like(allocation.alpha(), 0.5), atol=1e-6)


def test_centered_grid_starts_at_the_target():
    ranks = row_ranks(torch.rand(8, 16))
    for target in (0.3, 0.6, 0.7, 0.8):
        allocation = SparsityAllocation(ranks, candidate_rates(target), "row", True)
        assert torch.allclose(allocation.alpha(), torch.full((8,), target), atol=1e-5)
        low, high = smoothing_band(candidate_rates(target))
        assert low < target < high


def _optimise_penalty_only(smoothing: bool) -> float:
    ranks = row_ranks(torch.rand(4, 100))
    allocation = SparsityAllocation(ranks, candidate_rates(0.5, grid="uniform"), "row", smoothing)
    optimizer = torch.optim.Adam([allocation.logits], lr=0.1)
    for _ in range(1500):
        optimizer.zero_grad()
        sparsity_penalty(allocation.expected_sparsity(), 0.3).backward()
        optimizer.step()
    return float(allocation.expected_sparsity())


def test_sigmoid_smoothing_bounds_the_rate_near_0_376():
    reached = _optimise_penalty_only(smoothing=True)
    assert reached == pytest.approx(0.376, abs=0.003)
    assert smoothing_band(candidate_rates(0.5, grid="uniform"))[0] == pytest.approx(0.3763, abs=1e-3)


def test_without_smoothing_the_rate_reaches_the_target():
    assert _optimise_penalty_only(smoothing=False) == pytest.approx(0.3, abs=0.005)


def test_fixed_rate_one_half_reproduces_per_row_wanda_masks():
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(16, 40, generator=g)
    col_sq = torch.rand(40, generator=g)
    scores = wanda_scores(weight, col_sq)
    allocation = SparsityAllocation(row_ranks(scores), candidate_rates(0.5), "row", True)
    # logits at zero: alpha = 0.5 in every row, the uniform allocation
    assert torch.equal(allocation.hard_mask(), keep_mask_from_scores(scores, 0.5, "row"))


def test_prune_counts_forgive_float32_rounding_but_truncate_real_fractions():
    # 0.5 as a 101-term float32 sum comes out one ulp low on some CPUs: still half of 40
    assert prune_counts(torch.tensor([0.49999997, 0.5, 0.4999]), 40).tolist() == [20, 20, 19]


def test_exact_target_counts_hit_the_target_and_keep_the_allocation_order():
    from besa_pl.besa.allocation import exact_target_counts

    g = torch.Generator().manual_seed(5)
    alphas = [torch.full((64,), 0.3), 0.3 + 0.1 * torch.rand(32, generator=g)]
    counts = exact_target_counts(alphas, [64, 128], 0.35)
    assert sum(int(k.sum()) for k in counts) == round(0.35 * (64 * 64 + 32 * 128))
    order = torch.argsort(alphas[1])
    assert torch.all(counts[1][order].diff() >= -1)  # a higher learned rate never prunes clearly less


@pytest.mark.parametrize("granularity", ["row", "layer"])
def test_fast_straight_through_gradient_equals_the_reference_construction(granularity):
    allocation = random_allocation(rows=9, cols=31, granularity=granularity, seed=4)
    G = torch.randn(9, 31, generator=torch.Generator().manual_seed(7))
    (G * allocation.mask()).sum().backward()
    fast = allocation.logits.grad.clone()
    allocation.logits.grad = None
    reference = straight_through(allocation.hard_mask(), allocation.soft_mask())
    (G * reference).sum().backward()
    assert torch.allclose(fast, allocation.logits.grad, atol=1e-6)


def test_masked_weight_gradients_to_the_logits_and_the_weight_match_the_soft_mask_construction():
    allocation = random_allocation(rows=9, cols=31, seed=6)
    g = torch.Generator().manual_seed(8)
    weight, G = torch.randn(9, 31, generator=g).requires_grad_(True), torch.randn(9, 31, generator=g)
    (G * allocation(weight)).sum().backward()
    fast_logits, fast_weight = allocation.logits.grad.clone(), weight.grad.clone()
    allocation.logits.grad, weight.grad = None, None
    (G * weight * straight_through(allocation.hard_mask(), allocation.soft_mask())).sum().backward()
    assert torch.allclose(fast_logits, allocation.logits.grad, atol=1e-6)
    assert torch.equal(fast_weight, weight.grad)  # G * hard mask: a quantizer's clipping logits get it


def test_hard_keep_rebuilds_exactly_the_rows_whose_count_changed():
    allocation = random_allocation(seed=2)
    first = allocation.hard_keep(torch.float32)
    before = first.clone()
    assert torch.equal(first, allocation.hard_mask().float())
    with torch.no_grad():
        allocation.logits[3].add_(torch.linspace(-4, 4, allocation.logits.shape[1]))
    changed = allocation.hard_keep(torch.float32)
    assert torch.equal(changed, allocation.hard_mask().float())  # the same mask as built from scratch
    assert not torch.equal(changed[3], before[3]) and torch.equal(changed[:3], before[:3])
    assert allocation.hard_keep(torch.bfloat16).dtype == torch.bfloat16
