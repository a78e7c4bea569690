"""The block objective of BESA: channel-normalised reconstruction plus the sparsity penalty.

As in the official code: the mean over hidden channels of each channel's relative squared error,
plus lambda * ((s - s*) / s*)^2 (the paper writes lambda * (s - s*)^2: `penalty_form absolute`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from besa_pl.closedform.gram import exact_sum_dtype


def channel_square_sums(target: Tensor) -> Tensor:
    """sum over the micro-batch's tokens of Y[:, h]^2, per hidden channel h: each sample's sum in
    fp32, their sum in float64, so that splitting the micro-batch over DDP ranks (and all-reducing
    these) gives the very norms of one process holding every sample."""
    y = target.detach().float()
    per_sample = y.reshape(y.shape[0] if y.dim() > 2 else 1, -1, y.shape[-1]).pow(2).sum(dim=1)
    return per_sample.to(exact_sum_dtype(y.device)).sum(dim=0)


def channel_norms_squared(target: Tensor) -> Tensor:
    """`channel_square_sums` rounded to fp32."""
    return channel_square_sums(target).float()


def reconstruction_loss(output: Tensor, target: Tensor, norms_squared: Tensor | None = None) -> Tensor:
    """Mean over hidden channels of each channel's relative squared error (fp32).

    nu_h = ||Y[:, h]||_2 over this micro-batch's tokens, without gradient (the official code's
    normalisation). `norms_squared` gives nu^2 when the micro-batch is spread over several ranks.
    """
    y = target.float().reshape(-1, target.shape[-1])
    y_hat = output.float().reshape(-1, output.shape[-1])
    with torch.no_grad():
        squared = channel_norms_squared(target) if norms_squared is None else norms_squared
        nu = squared.sqrt().clamp_min(torch.finfo(torch.float32).tiny)
    return ((y - y_hat) / nu).pow(2).sum() / y.shape[-1]


def sparsity_penalty(expected: Tensor, target: float, weight: float = 5.0, form: str = "relative") -> Tensor:
    """lambda * ((s - s*) / s*)^2 (the code's form) or lambda * (s - s*)^2 (the paper's)."""
    if form == "relative":
        return weight * ((expected - target) / target) ** 2
    if form == "absolute":
        return weight * (expected - target) ** 2
    raise ValueError(f"unknown penalty form {form!r}")
