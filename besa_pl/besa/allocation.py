"""Sparsity allocation (BESA paper, Sec. 3): candidate rates, logits -> expected rate, and the masks.

All mask arithmetic runs in fp32 whatever the model dtype; the mask is cast to the weight
dtype only at the multiply.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def candidate_rates(target: float, num: int = 101, grid: str = "centered") -> Tensor:
    """The candidate pruning rates p_d.

    `uniform` is the official grid {0, 0.01, ..., 1}. `centered` is the widest evenly spaced
    grid inside [0, 1] whose mean is the target, so the logits start at the target and sigmoid
    smoothing keeps its +/-12% band around it; at target 0.5 it equals `uniform`.
    """
    if grid == "uniform":
        lo, hi = 0.0, 1.0
    elif grid == "centered":
        half = min(target, 1.0 - target)
        lo, hi = target - half, target + half
    else:
        raise ValueError(f"unknown candidate grid {grid!r}")
    return torch.linspace(lo, hi, num, dtype=torch.float64).float()


def smoothing_band(rates: Tensor, scale: float = 1.0) -> tuple[float, float]:
    """The [min, max] expected rate that sigmoid smoothing allows on this grid.

    Softmax inputs lie in (0, scale), so a candidate's weight is at most e^scale times another's;
    the extreme rate puts that weight on every candidate on one side of the rate itself (a fixed
    point).
    """
    p = rates.double()
    ratio = math.exp(scale)

    def extreme(sign: float) -> float:
        alpha = float(p.mean())
        for _ in range(100):
            w = torch.where(sign * (p - alpha) > 0, ratio, 1.0)
            alpha = float((w * p).sum() / w.sum())
        return alpha

    return extreme(-1.0), extreme(1.0)


def mixture_weights(logits: Tensor, smoothing: bool, scale: float = 1.0) -> Tensor:
    """beta = softmax(scale * sigmoid(z)) with smoothing (the code's default: scale 1), else softmax(z)."""
    z = logits.float()
    return torch.softmax(scale * torch.sigmoid(z) if smoothing else z, dim=-1)


# C * alpha a few float32 roundings below an integer counts as that integer: alpha = 0.5 from equal
# logits comes out as 0.49999997 on some CPUs (the sum's order depends on the SIMD width), and plain
# truncation would then prune one weight fewer per row on those machines only.
_ROUNDING_SLACK = 1.0 + 16 * torch.finfo(torch.float32).eps


def prune_counts(alpha: Tensor, columns: int) -> Tensor:
    """k = floor(C * alpha): how many of a row's weights are pruned (truncation, float32 rounding forgiven)."""
    return torch.floor(alpha.double() * columns * _ROUNDING_SLACK).long().clamp_(0, columns)


def hard_keep_mask(ranks: Tensor, counts: Tensor) -> Tensor:
    """Keep a weight iff its rank is at least the row's prune count (counts: one per row)."""
    return ranks >= counts.view(-1, 1)


def rank_space_keep_prob(beta: Tensor, thresholds: Tensor, columns: int) -> Tensor:
    """u_j = 1 - sum_d beta_d [j < c_d] for j = 0..C-1, one row per group.

    Scatter beta into bins at c_d and take a reverse cumulative sum: O(K + C) per group
    instead of a K x C indicator product. Written literally (not via sum(beta) = 1) so the
    gradient with respect to beta is exactly -[j < c_d].
    """
    bins = beta.new_zeros(beta.shape[0], columns + 1)
    bins.index_add_(1, thresholds, beta)
    at_least = bins.flip(1).cumsum(dim=1).flip(1)  # at_least[:, j] = sum of beta_d with c_d >= j
    return 1.0 - at_least[:, 1:]


def gather_by_rank(u: Tensor, ranks: Tensor) -> Tensor:
    """P[r, c] = u[group(r), rank[r, c]], with int32 ranks (no int64 copy of the rank matrix)."""
    rows, columns = ranks.shape
    if u.shape[0] == 1:
        return u.reshape(-1)[ranks]
    offsets = torch.arange(rows, device=ranks.device, dtype=torch.int32).view(-1, 1) * columns
    return u.reshape(-1)[ranks + offsets]


def straight_through(hard: Tensor, soft: Tensor) -> Tensor:
    """Forward value exactly `hard`; gradient flows to `soft` as if the mask were soft."""
    return hard.float() + (soft - soft.detach())


class _MaskedWeight(torch.autograd.Function):
    """Forward: the weight times the hard mask. Backward: the soft mask's gradient, in rank space.

    The same gradient as weight * straight_through(hard, gather_by_rank(u, ranks)), with no soft
    mask in the forward pass at all: its value is never used there (P - sg(P) = 0), so u is not
    built. In backward, the mask's gradient G * W is read in rank order (a gather by the inverse
    permutation: no scatter-add, which is slow on CPUs), summed over the rows that share beta, and
    d u_j / d beta_d = -[j < c_d] makes the gradient of beta_d minus the sum over ranks below c_d:
    one prefix sum per row, read at the thresholds.
    """

    @staticmethod
    def forward(ctx, weight: Tensor, beta: Tensor, keep: Tensor, order_flat: Tensor, thresholds: Tensor) -> Tensor:
        ctx.save_for_backward(weight, keep, order_flat, thresholds)
        ctx.groups = beta.shape[0]
        return weight * keep

    @staticmethod
    def backward(ctx, grad: Tensor):
        weight, keep, order_flat, thresholds = ctx.saved_tensors
        grad_weight = grad * keep if ctx.needs_input_grad[0] else None
        grad_beta = None
        if ctx.needs_input_grad[1]:
            in_rank_order = (grad * weight).float().reshape(-1)[order_flat]
            if ctx.groups == 1:
                in_rank_order = in_rank_order.sum(dim=0, keepdim=True)
            below = torch.nn.functional.pad(in_rank_order.cumsum(dim=1), (1, 0))  # below[:, k]: ranks < k
            grad_beta = -below.index_select(1, thresholds)
        return grad_weight, grad_beta, None, None, None


class SparsityAllocation(nn.Module):
    """Learnable per-row (or per-layer) pruning rate of one linear weight.

    Holds the frozen rank matrix and the logits; `forward(weight)` returns the masked weight, so
    it can serve as a `torch.nn.utils.parametrize` parametrization of the linear's weight.
    """

    def __init__(
        self,
        ranks: Tensor,
        rates: Tensor,
        granularity: str = "row",
        smoothing: bool = True,
        smoothing_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if granularity not in ("row", "layer"):
            raise ValueError(f"unknown granularity {granularity!r}")
        rows, columns = ranks.shape
        self.granularity = granularity
        self.smoothing = smoothing
        self.smoothing_scale = smoothing_scale
        self.columns = columns
        groups = rows if granularity == "row" else 1
        ranks = ranks.to(torch.int32)
        self.register_buffer("ranks", ranks, persistent=False)
        # Flat index of the column holding rank m at position m of row r (int32, like the ranks):
        # reads the mask's gradient in rank order.
        order = torch.argsort(ranks, dim=1).to(torch.int32)
        offsets = torch.arange(rows, dtype=torch.int32, device=ranks.device).view(-1, 1) * columns
        self.register_buffer("order_flat", order + offsets, persistent=False)
        self.register_buffer("rates", rates.float(), persistent=False)
        self.register_buffer("thresholds", torch.floor(rates.double() * columns).long(), persistent=False)
        self.logits = nn.Parameter(torch.zeros(groups, rates.numel()))
        self._keep: tuple[Tensor, Tensor] | None = None  # (prune counts, hard keep-mask) of the last step

    def beta(self) -> Tensor:
        return mixture_weights(self.logits, self.smoothing, self.smoothing_scale)

    def alpha(self) -> Tensor:
        """Expected pruning rate of each group (fp32)."""
        return self.beta() @ self.rates

    def row_alpha(self) -> Tensor:
        alpha = self.alpha()
        return alpha.expand(self.ranks.shape[0]) if alpha.numel() == 1 else alpha

    def expected_sparsity(self) -> Tensor:
        """Mean expected rate over the layer's groups (differentiable)."""
        return self.alpha().mean()

    def hard_mask(self, counts: Tensor | None = None) -> Tensor:
        """Keep-mask from the expected rates (or from given per-row prune counts)."""
        with torch.no_grad():
            counts = prune_counts(self.row_alpha(), self.columns) if counts is None else counts
            return hard_keep_mask(self.ranks, counts)

    def soft_mask(self) -> Tensor:
        u = rank_space_keep_prob(self.beta(), self.thresholds, self.columns)
        return gather_by_rank(u, self.ranks)

    def hard_keep(self, dtype: torch.dtype) -> Tensor:
        """The hard keep-mask as numbers of `dtype`, kept from step to step: only the rows whose prune
        count changed are rebuilt (a step moves few rows' counts)."""
        with torch.no_grad():
            counts = prune_counts(self.row_alpha(), self.columns)
            cached = self._keep
            if cached is None or cached[1].dtype != dtype or cached[1].device != counts.device:
                self._keep = (counts, hard_keep_mask(self.ranks, counts).to(dtype))
                return self._keep[1]
            old, keep = cached
            changed = torch.nonzero(old != counts).flatten()
            if changed.numel():
                keep[changed] = hard_keep_mask(self.ranks[changed], counts[changed]).to(dtype)
                self._keep = (counts, keep)
            return keep

    def mask(self) -> Tensor:
        """Straight-through mask: forward value is the hard mask, gradient via the soft one."""
        ones = torch.ones((), device=self.ranks.device).expand(self.ranks.shape)
        return _MaskedWeight.apply(ones, self.beta(), self.hard_keep(torch.float32), self.order_flat, self.thresholds)

    def forward(self, weight: Tensor) -> Tensor:
        """weight * the straight-through mask (the mask's arithmetic in fp32, its product in the weight's dtype)."""
        with torch.autocast(weight.device.type, enabled=False):
            return _MaskedWeight.apply(
                weight, self.beta(), self.hard_keep(weight.dtype), self.order_flat, self.thresholds
            )


@torch.no_grad()
def exact_target_counts(row_alphas: list[Tensor], columns: list[int], target: float) -> list[Tensor]:
    """Per-row prune counts that keep the learned allocation and hit the block's target exactly.

    The floors and the penalty's equilibrium leave the realised sparsity a little off s*. All
    rows' rates are shifted by one common amount (bisection), and the few rows whose count
    steps at that very shift give back the excess, one weight each, in row order.
    """
    total = sum(a.numel() * c for a, c in zip(row_alphas, columns))
    wanted = round(target * total)

    def counts(shift: float) -> list[Tensor]:
        return [prune_counts((a + shift).clamp(0, 1), c) for a, c in zip(row_alphas, columns)]

    low, high = -1.0, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        if sum(int(k.sum()) for k in counts(mid)) >= wanted:
            high = mid
        else:
            low = mid
    result, below = counts(high), counts(low)
    excess = sum(int(k.sum()) for k in result) - wanted
    for k, k_low in zip(result, below):
        if excess <= 0:
            break
        stepped = torch.nonzero(k > k_low).flatten()[:excess]
        k[stepped] -= 1
        excess -= stepped.numel()
    return result
