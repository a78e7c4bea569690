"""One-shot pruning of a linear layer: magnitude, Wanda and SparseGPT (with its OBS update).

They run inside the same BlockwiseLoop as BESA (same calibration, pruned inputs fed forward),
so the methods compare on equal terms.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .importance import InputStatistics, damped_inverse_cholesky, magnitude_scores, wanda_scores


def parse_structure(structure: str | None) -> tuple[int, int] | None:
    """'2:4' -> (2, 4): keep N of every M consecutive input weights; None = unstructured."""
    if structure in (None, "", "unstructured"):
        return None
    n, m = (int(part) for part in structure.split(":"))
    return n, m


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
    blocksize: int = 128,
    percdamp: float = 0.01,
    log: Callable[[str], None] | None = None,
) -> tuple[Tensor, Tensor]:
    """SparseGPT: choose the mask column block by column block and update the kept weights (OBS).

    Returns (new weight in fp32, keep mask).
    """
    w = weight.float().clone()
    rows, columns = w.shape
    dead = torch.diag(hessian) == 0
    w[:, dead] = 0
    hinv = damped_inverse_cholesky(hessian.float(), percdamp, log)
    keep = torch.ones_like(w, dtype=torch.bool)
    for start in range(0, columns, blocksize):
        end = min(start + blocksize, columns)
        w1 = w[:, start:end].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[start:end, start:end]
        diag1 = torch.diag(hinv1)
        pruned1 = torch.zeros_like(w1, dtype=torch.bool)
        if structure is None:
            saliency = w1.pow(2) / diag1.pow(2).view(1, -1)
            cut = int(saliency.numel() * sparsity)
            if cut > 0:
                threshold = torch.sort(saliency.reshape(-1)).values[cut - 1]
                pruned1 = saliency <= threshold
        for i in range(end - start):
            if structure is not None and i % structure[1] == 0:
                n, m = structure
                saliency = w1[:, i : i + m].pow(2) / diag1[i : i + m].pow(2).view(1, -1)
                drop = torch.topk(saliency, m - n, dim=1, largest=False).indices
                pruned1.scatter_(1, i + drop, True)
            col = w1[:, i]
            d = hinv1[i, i]
            q = col.clone()
            q[pruned1[:, i]] = 0
            q1[:, i] = q
            err = (col - q) / d
            w1[:, i:] -= err.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, start:end] = q1
        keep[:, start:end] = ~pruned1
        w[:, end:] -= err1 @ hinv[start:end, end:]
    return w, keep


@torch.no_grad()
def prune_linear(
    method: str,
    linear: nn.Linear,
    stats: InputStatistics,
    sparsity: float,
    granularity: str = "row",
    structure: tuple[int, int] | None = None,
    log: Callable[[str], None] | None = None,
) -> Tensor:
    """Prune one linear in place with a one-shot method and return its keep mask."""
    weight = linear.weight
    if method == "sparsegpt":
        new_weight, keep = sparsegpt_prune(weight, stats.hessian, sparsity, structure, log=log)
        weight.copy_((new_weight * keep).to(weight.dtype))
        return keep
    if method == "magnitude":
        scores = magnitude_scores(weight)
    elif method == "wanda":
        scores = wanda_scores(weight, stats.col_sq)
    else:
        raise ValueError(f"unknown one-shot method {method!r}")
    keep = keep_mask_from_scores(scores, sparsity, granularity, structure)
    weight.mul_(keep.to(weight.dtype))
    return keep


def check_structure(structure: tuple[int, int] | None, columns: int, name: str) -> None:
    if structure is not None and columns % structure[1] != 0:
        raise ValueError(f"{name} has {columns} input features, not a multiple of M={structure[1]}")
