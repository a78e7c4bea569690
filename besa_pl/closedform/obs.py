"""The OBS column sweep shared by SparseGPT and the weight reconstruction (closed form, no training).

Frantar & Alistarh (SparseGPT, 2023) and GPTQ (Frantar et al., 2023) walk a weight matrix column by
column: each column is pruned (and/or quantized), and its error is spread over the columns not yet
visited through the upper Cholesky factor U of the inverse input Gram, so that ||(W - W_start) X||
stays small. Updates are applied lazily, `blocksize` columns at a time.

The sweep either chooses the mask itself (SparseGPT's adaptive mask selection, `select`) or takes a
given keep-mask (`keep`: the weight reconstruction after BESA has fixed the masks). With a `grid`
it also quantizes every kept weight (GPTQ), so pruned + quantized weights come out of one sweep.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from besa_pl.closedform.damping import damped_gram, damped_inverse_cholesky
from besa_pl.quant.quantizer import quant_params


@dataclass(frozen=True)
class QuantGrid:
    """Quantization inside the sweep: `bits`, groups of `group_size` input columns (None = the row),
    and per-group clipping strengths gamma/delta (1 = plain min-max; learned ones with BESA)."""

    bits: int
    group_size: int | None
    gamma: Tensor | None = None  # (rows, groups) or None
    delta: Tensor | None = None


class Selection(Protocol):
    """How the sweep chooses which weights to prune, column by column (SparseGPT's adaptive mask).

    At each column offset `i` of a lazy block of `width` columns, `window` says how many columns
    the selection decides now (0: none). The sweep then calls it with those columns' current
    weights and the diagonal of the inverse Cholesky factor (or, when `sees_rest` is true, with
    every column the row has left, of which the first `window` are decided), and gets back which
    of the window's weights to prune.
    """

    sees_rest: bool

    def window(self, i: int, width: int) -> int: ...

    def __call__(self, w: Tensor, diag: Tensor, column: int, window: int) -> Tensor: ...


@dataclass(frozen=True)
class SaliencySelect:
    """SparseGPT's unstructured mask choice during the sweep: in each lazy block, the weights with
    the lowest OBS saliency w^2 / U_cc^2 (as updated so far). N:M is `GroupSelect`."""

    sparsity: float
    sees_rest = False

    def window(self, i: int, width: int) -> int:
        return width if i == 0 else 0

    def __call__(self, w: Tensor, diag: Tensor, column: int, window: int) -> Tensor:
        saliency = w.pow(2) / diag.pow(2).view(1, -1)
        pruned = torch.zeros_like(w, dtype=torch.bool)
        cut = int(saliency.numel() * self.sparsity)
        if cut > 0:
            threshold = torch.sort(saliency.reshape(-1)).values[cut - 1]
            pruned = saliency <= threshold
        return pruned


@dataclass(frozen=True)
class GroupSelect:
    """N of every M columns, chosen as SparseGPT chooses under N:M: when the sweep reaches a group,
    its M - N weights of lowest OBS saliency (as updated so far) go. `column_weight` multiplies each
    column's saliency (BESA's learned channel scales under N:M; None = SparseGPT's own choice)."""

    n: int
    m: int
    column_weight: Tensor | None = None
    sees_rest = False

    @property
    def group(self) -> int:
        return self.m

    def window(self, i: int, width: int) -> int:
        return min(self.m, width - i) if i % self.m == 0 else 0

    def __call__(self, w: Tensor, diag: Tensor, column: int, window: int) -> Tensor:
        saliency = w.pow(2) / diag.pow(2).view(1, -1)
        if self.column_weight is not None:
            saliency = saliency * self.column_weight[column : column + window].to(w.device).view(1, -1)
        drop = torch.topk(saliency, self.m - self.n, dim=1, largest=False).indices
        return torch.zeros_like(w, dtype=torch.bool).scatter_(1, drop, True)


class LayerBudgetSelect:
    """The layer's count of a given mask, chosen as SparseGPT chooses: in each lazy block, the weights
    of lowest OBS saliency (as updated so far) over all rows, the block's share of the layer's count
    (proportional to its columns; the last block takes exactly what is left)."""

    sees_rest = False

    def __init__(self, keep: Tensor) -> None:
        self.left = int((~keep.bool()).sum())
        self.columns_left = keep.shape[1]

    def window(self, i: int, width: int) -> int:
        return width if i == 0 else 0

    def __call__(self, w: Tensor, diag: Tensor, column: int, window: int) -> Tensor:
        width = w.shape[1]
        cut = self.left if width == self.columns_left else round(self.left * width / self.columns_left)
        saliency = (w.pow(2) / diag.pow(2).view(1, -1)).reshape(-1)
        pruned = torch.zeros_like(saliency, dtype=torch.bool)
        pruned[torch.argsort(saliency, stable=True)[:cut]] = True
        self.left -= cut
        self.columns_left -= width
        return pruned.view_as(w)


class RowBudgetSelect:
    """The per-row counts of a given mask, SparseGPT's adaptive choice of where: at each lazy block,
    every row prunes the columns whose OBS saliency (as updated so far) is below its threshold over
    all the columns it has left, so its pruned weights go where the compensated saliency is lowest;
    the rest of its budget waits for later blocks. Each row ends with exactly its count."""

    sees_rest = True

    def __init__(self, keep: Tensor) -> None:
        self.left = (~keep.bool()).sum(dim=1)

    def window(self, i: int, width: int) -> int:
        return width if i == 0 else 0

    def __call__(self, w_rest: Tensor, diag_rest: Tensor, column: int, width: int) -> Tensor:
        saliency = w_rest.pow(2) / diag_rest.pow(2).view(1, -1)
        left = self.left.to(w_rest.device)
        if width == w_rest.shape[1]:  # the last block: exactly what is left
            cut = left
        else:
            order = torch.argsort(saliency, dim=1, stable=True)
            ranks = torch.empty_like(order).scatter_(
                1, order, torch.arange(w_rest.shape[1], device=w_rest.device).expand_as(order)
            )
            cut = (ranks[:, :width] < left.view(-1, 1)).sum(dim=1)  # this block's share of the row's lowest
        block = saliency[:, :width]
        order = torch.argsort(block, dim=1, stable=True)
        ranks = torch.empty_like(order).scatter_(1, order, torch.arange(width, device=w_rest.device).expand_as(order))
        pruned = ranks < cut.view(-1, 1)
        self.left = (left - pruned.sum(dim=1)).cpu()
        return pruned


@dataclass(frozen=True)
class CountSelect:
    """The counts of a given mask, SparseGPT's choice of weights: each row prunes, in each lazy block
    of columns, as many weights as the mask does there, picking those of lowest OBS saliency as
    updated so far. The allocation (per row and column block) is kept; which weights go adapts to
    the compensation, as in SparseGPT."""

    keep: Tensor
    sees_rest = False

    def window(self, i: int, width: int) -> int:
        return width if i == 0 else 0

    def __call__(self, w: Tensor, diag: Tensor, column: int, window: int) -> Tensor:
        counts = (~self.keep[:, column : column + w.shape[1]]).sum(dim=1, keepdim=True).to(w.device)
        saliency = w.pow(2) / diag.pow(2).view(1, -1)
        order = torch.argsort(saliency, dim=1, stable=True)
        ranks = torch.empty_like(order).scatter_(1, order, torch.arange(w.shape[1], device=w.device).expand_as(order))
        return ranks < counts


def _group_params(columns: Tensor, keep: Tensor, grid: QuantGrid, group: int) -> tuple[Tensor, Tensor]:
    """(scale, zero) per row of one quantization group, from its current kept weights (pruned = 0)."""
    one = torch.ones(columns.shape[0], 1, device=columns.device)
    gamma = grid.gamma[:, group : group + 1].to(columns.device) if grid.gamma is not None else one
    delta = grid.delta[:, group : group + 1].to(columns.device) if grid.delta is not None else one
    scale, zero = quant_params(columns * keep, grid.bits, None, gamma, delta)
    return scale.reshape(-1), zero.reshape(-1)


@torch.no_grad()
def obs_sweep(
    weight: Tensor,
    hessian: Tensor,
    keep: Tensor | None = None,
    select: Selection | None = None,
    grid: QuantGrid | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    log: Callable[[str], None] | None = None,
) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor] | None]:
    """Prune (given `keep`, or chosen by `select`) and optionally quantize W, spreading each error.

    Returns (new weight in fp32 with pruned entries exactly 0, keep-mask, (scale, zero) or None).
    """
    if (keep is None) == (select is None):
        raise ValueError("give exactly one of keep and select")
    w = weight.float().clone()
    rows, columns = w.shape
    dead = torch.diag(hessian) == 0
    w[:, dead] = 0
    upper = damped_inverse_cholesky(hessian.float(), percdamp, log)
    keep_out = torch.ones_like(w, dtype=torch.bool) if keep is None else keep.to(w.device, torch.bool).clone()
    scales = zeros = None
    size = columns
    group = getattr(select, "group", None)
    if group:  # lazy blocks hold whole N:M groups, so every group is decided at once
        blocksize = group * max(1, blocksize // group)
    if grid is not None:
        size = grid.group_size or columns
        groups = columns // size
        scales = w.new_zeros(rows, groups)
        zeros = w.new_zeros(rows, groups)
        if size < columns:  # every quantization group (and N:M group) lies inside one lazy block
            unit = math.lcm(size, group or 1)
            blocksize = unit * max(1, blocksize // unit)
    for start in range(0, columns, blocksize):
        end = min(start + blocksize, columns)
        w1 = w[:, start:end].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        u1 = upper[start:end, start:end]
        k1 = keep_out[:, start:end]  # a view: the choices below land in keep_out
        for i in range(end - start):
            column = start + i
            window = select.window(i, end - start) if select is not None else 0
            if window:
                if select.sees_rest:  # at i = 0, w[:, start:] is the row's rest as updated so far
                    k1[:, i : i + window] = ~select(w[:, column:], torch.diag(upper)[column:], column, window)
                else:
                    k1[:, i : i + window] = ~select(
                        w1[:, i : i + window], torch.diag(u1)[i : i + window], column, window
                    )
            if grid is not None and column % size == 0:
                # From the weights as updated so far (GPTQ's order); a whole-row group is set at
                # column 0, before any update.
                source = w if size == columns else w1[:, i : i + size]
                scale, zero = _group_params(source, keep_out[:, column : column + size], grid, column // size)
                scales[:, column // size], zeros[:, column // size] = scale, zero
            col = w1[:, i]
            q = col * k1[:, i]
            if grid is not None:
                g = column // size
                codes = torch.clamp(torch.round(q / scales[:, g]) + zeros[:, g], 0, 2**grid.bits - 1)
                q = (codes - zeros[:, g]) * scales[:, g] * k1[:, i]
            q1[:, i] = q
            d = u1[i, i]
            err = (col - q) / d
            w1[:, i:] -= err.unsqueeze(1) @ u1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, start:end] = q1
        w[:, end:] -= err1 @ upper[start:end, end:]
    return w, keep_out, (scales, zeros) if grid is not None else None


@torch.no_grad()
def least_squares_start(weight: Tensor, hessian: Tensor, cross: Tensor, percdamp: float = 0.01) -> Tensor:
    """W0 C (H + damp I)^-1: the dense weight that best maps the pruned-path inputs X to the
    reference outputs W0 X_ref (C = X_ref X^T, H = X X^T). Sweeping from it under the mask minimises
    ||W X - W0 X_ref|| instead of ||(W - W0) X||, so a linear also corrects the error of the
    sublayers (and blocks) before it: the asymmetric calibration of GPTAQ (Li et al., 2025)."""
    h, _ = damped_gram(hessian, percdamp)
    rhs = weight.float() @ cross.float()  # W0 X_ref X^T
    return torch.linalg.solve(h, rhs.t(), left=True).t()  # H symmetric: (H^-1 rhs^T)^T = rhs H^-1
