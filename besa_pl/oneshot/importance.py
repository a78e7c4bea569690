"""Importance scores of weights (Wanda: |W| * ||X||, Sun et al. 2024) and the per-row ranks BESA
learns over.

Input statistics are gathered with forward hooks during the reference pass of a block; the
ranks are computed once per block and never again (weights do not change during BESA).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from besa_pl.closedform.damping import damped_inverse_cholesky
from besa_pl.closedform.gram import RunningGram, exact_sum_dtype
from besa_pl.models.activations import run_block
from besa_pl.models.loading import prunable_linears
from besa_pl.ranks import sum_over_ranks


class SharedGrams:
    """Linears called on the very same input tensor (q/k/v, gate/up) share one Gram, so a block's
    reference pass takes 4 Grams instead of 7, with the same values (each would have summed the
    same products in the same order)."""

    def __init__(self) -> None:
        self.last_input: Tensor | None = None
        self.last_gram: RunningGram | None = None


class InputStatistics:
    """Streaming fp32 statistics of a linear layer's inputs over the calibration tokens.

    `col_sq` is the mean over sequences of each input feature's squared L2 norm (Wanda), summed in
    float64 like the Gram (`RunningGram`), so the sample order and the rank count do not change it;
    with `gram=True` SparseGPT's Hessian X X^T is accumulated as well (`RunningGram`: the mean over
    tokens; SparseGPT's 2 X X^T / n differs only by a scale, which its relative damping cancels),
    shared with the linears before it on the same input when they use one `shared` pool.
    """

    def __init__(self, linear: nn.Linear, gram: bool = False, shared: SharedGrams | None = None) -> None:
        columns = linear.in_features
        device = linear.weight.device
        self._col_sq_total = torch.zeros(columns, dtype=exact_sum_dtype(device), device=device)
        self._gram = RunningGram(columns, device) if gram else None
        self._shared = shared
        self.samples = 0
        self._handle = linear.register_forward_hook(self._hook)

    @torch.no_grad()
    def _hook(self, module: nn.Module, inputs: tuple, output: Tensor) -> None:
        original = inputs[0]
        batch = original.shape[0] if original.dim() > 2 else 1
        x = original.detach().reshape(-1, original.shape[-1]).float()
        self._col_sq_total += x.pow(2).sum(dim=0)  # a mean, as in the reference code: no growth with N
        if self._gram is not None:
            shared = self._shared
            if shared is not None and shared.last_input is original:
                self._gram = shared.last_gram  # the same Gram object at every sample
            else:
                self._gram.add(x)
                if shared is not None:
                    shared.last_input, shared.last_gram = original, self._gram
        self.samples += batch

    @property
    def col_sq(self) -> Tensor:
        return (self._col_sq_total / max(self.samples, 1)).float()

    @property
    def hessian(self) -> Tensor | None:
        return self._gram.value if self._gram is not None else None

    def remove(self) -> None:
        self._handle.remove()

    def combine_ranks(self) -> None:
        """Under DDP: the statistics over every rank's samples (unchanged on one process)."""
        self._col_sq_total, self.samples = sum_over_ranks(self._col_sq_total, self.samples)
        if self._gram is not None:
            self._gram.combine_ranks()


def magnitude_scores(weight: Tensor) -> Tensor:
    return weight.detach().float().abs()


def wanda_scores(weight: Tensor, col_sq: Tensor) -> Tensor:
    """|W| * ||X_c||_2 (the 1/N factor in col_sq does not change any ordering)."""
    return weight.detach().float().abs() * col_sq.sqrt().view(1, -1)


def sparsegpt_scores(weight: Tensor, hessian: Tensor, percdamp: float = 0.01) -> Tensor:
    """OBS saliency W^2 / diag(U)^2 with U the upper Cholesky factor of the damped H^-1."""
    upper = damped_inverse_cholesky(hessian.float(), percdamp)
    w = weight.detach().float().clone()
    w[:, torch.diag(hessian) == 0] = 0
    return w.pow(2) / torch.diag(upper).pow(2).view(1, -1)


def row_ranks(scores: Tensor) -> Tensor:
    """Rank of every weight within its row, 0 = least important; stable (ties keep column order)."""
    order = torch.argsort(scores, dim=1, stable=True)
    ranks = torch.empty_like(order, dtype=torch.int32)
    positions = torch.arange(scores.shape[1], dtype=torch.int32, device=scores.device)
    ranks.scatter_(1, order, positions.expand_as(ranks).contiguous())
    return ranks


def importance_scores(metric: str, weight: Tensor, stats: InputStatistics, percdamp: float = 0.01) -> Tensor:
    if metric == "wanda":
        return wanda_scores(weight, stats.col_sq)
    if metric == "magnitude":
        return magnitude_scores(weight)
    if metric == "sparsegpt":
        if stats.hessian is None:
            raise ValueError("sparsegpt importance needs InputStatistics(gram=True)")
        return sparsegpt_scores(weight, stats.hessian, percdamp)
    raise ValueError(f"unknown importance metric {metric!r}")


@torch.no_grad()
def reference_pass(block: nn.Module, inputs: Tensor, kwargs: dict, device, gram: bool = False):
    """The dense block on the current inputs: its outputs, and every linear's input statistics."""
    linears = prunable_linears(block)
    shared = SharedGrams()
    stats = {name: InputStatistics(linear, gram=gram, shared=shared) for name, linear in linears.items()}
    try:
        outputs = run_block(block, inputs, kwargs, device)
    finally:
        for stat in stats.values():
            stat.remove()
        shared.last_input = None
    for stat in stats.values():
        stat.combine_ranks()
    return outputs, stats


def score_linears(
    block: nn.Module, stats: dict[str, InputStatistics], metric: str, percdamp: float = 0.01
) -> dict[str, Tensor]:
    """Every linear's importance scores under `metric`, from the reference pass's statistics
    (`percdamp`: the damping of the sparsegpt metric)."""
    return {
        name: importance_scores(metric, linear.weight, stats[name], percdamp)
        for name, linear in prunable_linears(block).items()
    }
