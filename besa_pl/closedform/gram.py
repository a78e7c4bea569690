"""The one Gram accumulator of the closed-form part: H = mean over tokens of x x^T (and the cross
Gram mean of x_ref x^T), kept as a running mean so its scale does not grow with the number of
calibration tokens. The scale never matters to the results (damping is relative to H's mean
diagonal); one convention keeps every sweep, solve and score comparable."""

from __future__ import annotations

import torch
from torch import Tensor

from besa_pl.ranks import mean_over_ranks


class RunningGram:
    def __init__(self, columns: int, device) -> None:
        self.value = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.tokens = 0
        self._combined = False

    @torch.no_grad()
    def add(self, x: Tensor, x_left: Tensor | None = None) -> None:
        """Adds rows of `x` (tokens x columns, fp32): x^T x, or x_left^T x for a cross Gram."""
        total = self.tokens + x.shape[0]
        left = x if x_left is None else x_left
        self.value.mul_(self.tokens / total).addmm_(left.t(), x, alpha=1.0 / total)
        self.tokens = total

    def combine_ranks(self) -> Tensor:
        """Under DDP: the mean over every rank's tokens (unchanged on one process), once however often
        it is asked (linears that share this Gram each ask). Returns the Gram."""
        if not self._combined:
            self.value, self.tokens = mean_over_ranks(self.value, self.tokens)
            self._combined = True
        return self.value
