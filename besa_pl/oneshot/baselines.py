"""One-shot pruning of a linear layer: magnitude, Wanda and SparseGPT (with its OBS update).

They run inside the same BlockwiseLoop as BESA (same calibration, pruned inputs fed forward),
so the methods compare on equal terms.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from besa_pl.closedform.obs import GroupSelect, QuantGrid, SaliencySelect, obs_sweep
from besa_pl.errors import BesaError
from besa_pl.models.loading import prunable_linears
from besa_pl.oneshot.importance import InputStatistics, magnitude_scores, wanda_scores


def keep_mask_from_scores(
    scores: Tensor, sparsity: float, granularity: str = "row", structure: tuple[int, int] | None = None
) -> Tensor:
    """Keep-mask that drops the lowest scores: per row, per layer, or N:M along the inputs."""
    rows, columns = scores.shape
    if structure is not None:
        n, m = structure
        groups = scores.reshape(rows, columns // m, m)
        drop = torch.topk(groups, m - n, dim=-1, largest=False).indices
        keep = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, drop, False)
        return keep.reshape(rows, columns)
    if granularity == "layer":
        count = int(scores.numel() * sparsity)
        order = torch.argsort(scores.reshape(-1), stable=True)
        keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
        keep[order[:count]] = False
        return keep.reshape(rows, columns)
    count = int(columns * sparsity)
    order = torch.argsort(scores, dim=1, stable=True)
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep.scatter_(1, order[:, :count], False)
    return keep


@torch.no_grad()
def sparsegpt_prune(
    weight: Tensor,
    hessian: Tensor,
    sparsity: float,
    structure: tuple[int, int] | None = None,
    grid: QuantGrid | None = None,
    log: Callable[[str], None] | None = None,
    percdamp: float = 0.01,
) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor] | None]:
    """SparseGPT: choose the mask during the OBS sweep and update the kept weights (quantizing them
    too, GPTQ-style, with a `grid`). Returns (new weight in fp32, keep mask, (scale, zero) or None)."""
    select = GroupSelect(*structure) if structure is not None else SaliencySelect(sparsity)
    return obs_sweep(weight, hessian, select=select, grid=grid, percdamp=percdamp, log=log)


@torch.no_grad()
def prune_linear(
    method: str,
    linear: nn.Linear,
    stats: InputStatistics,
    sparsity: float,
    granularity: str = "row",
    structure: tuple[int, int] | None = None,
    grid: QuantGrid | None = None,
    log: Callable[[str], None] | None = None,
    percdamp: float = 0.01,
) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
    """Prune one linear in place with a one-shot method; returns its keep mask and, when SparseGPT
    quantized inside its sweep (`grid`), the (scale, zero) per group."""
    weight = linear.weight
    if method == "sparsegpt":
        new_weight, keep, qparams = sparsegpt_prune(
            weight, stats.hessian, sparsity, structure, grid, log=log, percdamp=percdamp
        )
        weight.copy_((new_weight * keep).to(weight.dtype))
        return keep, (qparams[0].cpu(), qparams[1].cpu()) if qparams is not None else None
    if method == "magnitude":
        scores = magnitude_scores(weight)
    elif method == "wanda":
        scores = wanda_scores(weight, stats.col_sq)
    else:
        raise ValueError(f"unknown one-shot method {method!r}")
    keep = keep_mask_from_scores(scores, sparsity, granularity, structure)
    weight.mul_(keep.to(weight.dtype))
    return keep, None


def check_shapes(settings, blocks) -> None:
    """N:M structure and quantization groups must divide every linear's input features."""
    group = settings.quant.group_size if settings.quant.enabled else None
    for index, block in enumerate(blocks):
        for name, linear in prunable_linears(block).items():
            columns = linear.in_features
            if settings.nm is not None and columns % settings.nm[1]:
                raise BesaError(
                    f"model.structure={settings.structure}: block {index} {name} has {columns} input "
                    f"features, not a multiple of {settings.nm[1]}; pick another N:M"
                )
            if group is not None and columns % group:
                raise BesaError(
                    f"model.quant.group_size={group} does not divide block {index} {name}'s "
                    f"{columns} input features; pick a divisor or leave it unset"
                )
