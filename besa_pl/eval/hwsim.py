"""Cycle model of a ViTCoD-style accelerator running one sparse weight matrix (the BESA paper's
simulated speed-up, after ViTCoD, You et al., HPCA 2023).

A PE array (64 x 64 by default) is split into a dense engine, which computes whole "dense"
columns including their zeros, and a sparse engine, which computes only the kept weights of
the other columns; both run in parallel. Only per-column nonzero counts are needed, so there
is no graph, no permutation and nothing that depends on a column's index. Two bugs of the
original simulator are fixed: dense work is out_features x dense columns (not in_features x
dense columns), and there is no magic placeholder id that collides with real columns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Accelerator:
    pe_rows: int = 64
    pe_cols: int = 64
    theta: float = 0.5  # a column is dense if its kept weights exceed theta * rows
    theta_step: float = 0.1
    tries: int = 5
    dense_share_band: tuple[float, float] = (0.4, 0.6)


@dataclass(frozen=True)
class Cycles:
    cycles: int
    dense_cycles: int
    sparse_cycles: int
    flops: int
    dense_columns: int


def split_cycles(col_nnz: Tensor, rows: int, theta: float, acc: Accelerator) -> tuple[Cycles, float]:
    """Cycles for one threshold; also the dense engine's share of the kept weights."""
    dense = col_nnz > theta * rows
    n_dense = int(dense.sum())
    nnz_sparse = int(col_nnz[~dense].sum())
    nnz_total = int(col_nnz.sum())
    dense_work = n_dense * rows
    if dense_work + nnz_sparse == 0:
        return Cycles(0, 0, 0, 0, 0), 0.0
    share = dense_work / (dense_work + nnz_sparse)
    width_dense = math.floor(acc.pe_cols * share)
    # An engine with work gets at least one PE column, and leaves one to the other if it has work.
    if n_dense > 0:
        width_dense = max(width_dense, 1)
    if nnz_sparse > 0:
        width_dense = min(width_dense, acc.pe_cols - 1)
    width_sparse = acc.pe_cols - width_dense
    dense_cycles = math.ceil(dense_work / (width_dense * acc.pe_rows)) if n_dense else 0
    sparse_cycles = math.ceil(nnz_sparse / (width_sparse * acc.pe_rows)) if nnz_sparse else 0
    kept_share = int(col_nnz[dense].sum()) / nnz_total if nnz_total else 0.0
    return Cycles(
        max(dense_cycles, sparse_cycles), dense_cycles, sparse_cycles, dense_work + nnz_sparse, n_dense
    ), kept_share


def patch_cycles(col_nnz: Tensor, rows: int, acc: Accelerator) -> Cycles:
    """Best cycle count over the adaptive thresholds for one R x C' patch."""
    theta = acc.theta
    best: Cycles | None = None
    low, high = acc.dense_share_band
    for _ in range(acc.tries):
        cycles, share = split_cycles(col_nnz, rows, theta, acc)
        if best is None or cycles.cycles < best.cycles:
            best = cycles
        if low <= share <= high:
            break
        theta = theta - acc.theta_step if share < low else theta + acc.theta_step
    return best


def matrix_cycles(mask: Tensor, acc: Accelerator = Accelerator()) -> Cycles:
    """Cycles of a keep-mask (rows = out features); wide matrices run as R x R column patches."""
    rows, cols = mask.shape
    col_nnz = mask.bool().sum(dim=0)
    width = rows if cols > rows else cols
    parts = [patch_cycles(col_nnz[start : start + width], rows, acc) for start in range(0, cols, width)]
    return Cycles(
        cycles=sum(p.cycles for p in parts),
        dense_cycles=sum(p.dense_cycles for p in parts),
        sparse_cycles=sum(p.sparse_cycles for p in parts),
        flops=sum(p.flops for p in parts),
        dense_columns=sum(p.dense_columns for p in parts),
    )


def dense_cycles(rows: int, cols: int, acc: Accelerator = Accelerator()) -> int:
    """The dense baseline: every column dense."""
    return matrix_cycles(torch.ones(rows, cols, dtype=torch.bool), acc).cycles
