"""The one Gram accumulator of the closed-form part: H = mean over tokens of x x^T (and the cross
Gram mean of x_ref x^T). The scale never matters to the results (damping is relative to H's mean
diagonal); one convention keeps every sweep, solve and score comparable.

Each sample's product is taken in fp32 and summed in float64, then divided and rounded to fp32
once. The float64 sum of fp32 products is (nearly always) exact, so the order of the samples, and
how many DDP ranks share them, does not change the Gram: one process and R ranks choose the same
masks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from besa_pl.ranks import sum_over_ranks


def exact_sum_dtype(device) -> torch.dtype:
    """float64 where the device has it (Apple's MPS has not: float32 there)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


class RunningGram:
    def __init__(self, columns: int, device) -> None:
        self.total = torch.zeros(columns, columns, dtype=exact_sum_dtype(device), device=device)
        self.tokens = 0
        self._value: Tensor | None = None
        self._combined = False

    @torch.no_grad()
    def add(self, x: Tensor, x_left: Tensor | None = None) -> None:
        """Adds rows of `x` (tokens x columns, fp32): x^T x, or x_left^T x for a cross Gram."""
        left = x if x_left is None else x_left
        self.total += left.t() @ x
        self.tokens += x.shape[0]
        self._value = None

    @property
    def value(self) -> Tensor:
        """The mean over the tokens added so far, in fp32."""
        if self._value is None:
            self._value = (self.total / max(self.tokens, 1)).float()
        return self._value

    def combine_ranks(self) -> Tensor:
        """Under DDP: the mean over every rank's tokens (unchanged on one process), once however often
        it is asked (linears that share this Gram each ask). Returns the Gram."""
        if not self._combined:
            self.total, self.tokens = sum_over_ranks(self.total, self.tokens)
            self._combined = True
            self._value = None
        return self.value
