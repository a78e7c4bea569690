"""The exact N:M check: every group of M consecutive inputs of every pruned row has at most N non-zeros.

Run on the weights as written (after the reconstruction and its swaps), so a bug anywhere in the
path stops the run instead of shipping a model that sparse kernels would reject.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from besa_pl.errors import BesaError
from besa_pl.models.loading import prunable_linears


def groups_over_n(weight: Tensor, n: int, m: int) -> int:
    """How many groups of M consecutive inputs (per row) hold more than N non-zero weights."""
    nonzero = (weight != 0).reshape(weight.shape[0], -1, m).sum(dim=-1)
    return int((nonzero > n).sum())


@torch.no_grad()
def check_n_of_m(block: nn.Module, n: int, m: int, index: int) -> dict[str, int]:
    """{"groups": G, "groups_over_n": 0} for the block's linears; raises naming the first bad linear."""
    groups = 0
    for name, linear in prunable_linears(block).items():
        over = groups_over_n(linear.weight, n, m)
        if over:
            raise BesaError(
                f"block {index} {name}: {over} groups of {m} inputs keep more than {n} weights after pruning; "
                "this is a bug in besa-pl, please report it with the command line"
            )
        groups += linear.weight.numel() // m
    return {"groups": groups, "groups_over_n": 0}
