"""The block objective (BESA_SPEC 7): channel-normalised reconstruction plus the sparsity penalty."""

from __future__ import annotations

import torch
from torch import Tensor


def reconstruction_loss(output: Tensor, target: Tensor) -> Tensor:
    """Mean over hidden channels of each channel's relative squared error (fp32).

    nu_h = ||Y[:, h]||_2 over this micro-batch's tokens, without gradient.
    """
    y = target.float().reshape(-1, target.shape[-1])
    y_hat = output.float().reshape(-1, output.shape[-1])
    with torch.no_grad():
        nu = y.pow(2).sum(dim=0).sqrt().clamp_min(torch.finfo(torch.float32).tiny)
    return ((y - y_hat) / nu).pow(2).sum() / y.shape[-1]


def sparsity_penalty(expected: Tensor, target: float, weight: float = 5.0, form: str = "relative") -> Tensor:
    """lambda * ((s - s*) / s*)^2 (the code's form) or lambda * (s - s*)^2 (the paper's)."""
    if form == "relative":
        return weight * ((expected - target) / target) ** 2
    if form == "absolute":
        return weight * (expected - target) ** 2
    raise ValueError(f"unknown penalty form {form!r}")
