"""SparseGPT's damping of an input Gram (lambda = percdamp x its mean diagonal), the one rule every
OBS sweep, least-squares solve and SparseGPT score uses."""

from __future__ import annotations

import torch
from torch import Tensor


def dead_filled_and_damping(hessian: Tensor, percdamp: float) -> tuple[Tensor, Tensor]:
    """(H with a 1 on the diagonal of never-active inputs, SparseGPT's damping percdamp * mean diag):
    the one damping the sweep, its least-squares start and the exact solve all use."""
    h = hessian.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    return h, percdamp * torch.mean(torch.diag(h).abs()).clamp_min(1e-8)


def add_damping(h: Tensor, damp: Tensor) -> Tensor:
    """H + lambda I (a new tensor)."""
    return h + damp * torch.eye(h.shape[0], device=h.device, dtype=h.dtype)


def damped_gram(hessian: Tensor, percdamp: float) -> tuple[Tensor, Tensor]:
    """(H + lambda I in fp32 with a 1 on the diagonal of never-active inputs, which inputs are active)."""
    alive = torch.diag(hessian) > 0
    h, damp = dead_filled_and_damping(hessian.float(), percdamp)
    return add_damping(h, damp), alive


def damped_inverse_cholesky(hessian: Tensor, percdamp: float, log=None) -> Tensor:
    """Upper Cholesky factor of the inverse of the damped Hessian.

    A Hessian that is not positive definite even after damping gets ten times more damping,
    up to five times; each retry is reported through `log`.
    """
    h, damp = dead_filled_and_damping(hessian, percdamp)
    for _attempt in range(6):
        chol, info = torch.linalg.cholesky_ex(add_damping(h, damp))
        if int(info) == 0:
            inverse = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper
        if log is not None:
            log(f"Hessian not positive definite with damping {float(damp):.3g}; retrying with 10x more")
        damp = damp * 10
    raise RuntimeError("Hessian stays singular after raising the damping 10^5 times")
