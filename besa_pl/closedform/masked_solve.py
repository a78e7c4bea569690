"""The optimal kept weights for a fixed mask: masked least squares, solved by conjugate gradients.

SparseGPT's sweep (`obs.obs_sweep`) updates only the columns to the right of the one it prunes, so
for a given mask its weights are not the best ones: a kept weight left of a pruned one never
absorbs that weight's error. With the mask fixed, each row r has a small convex problem,

    min over w (zero where the mask prunes) of  (w - w0_r) (H + lambda I) (w - w0_r)^T,

with H = X X^T the input Gram of the sublayer and lambda the sweep's damping. Boza (2024, "Fast
and Optimal Weight Update for Pruned Large Language Models") solves it with ADMM; here it is
preconditioned conjugate gradients on the kept weights of every row at once (diagonal
preconditioner, warm start from the sweep). On the demo model it lowers each sublayer's
reconstruction error by 15-27% below the sweep's; 15 steps are within 0.2% of 50 steps' error.
"""

from __future__ import annotations

import torch
from torch import Tensor

from besa_pl.closedform.damping import damped_gram


def conjugate_gradients(
    w: Tensor, start: Tensor, h: Tensor, free: Tensor, iterations: int, tolerance: float = 1e-8
) -> tuple[Tensor, Tensor]:
    """Lower (w - start) h (w - start)^T row by row over the entries where `free` is 1, in place.
    Returns (w, its gradient (w - start) h), the gradient kept up to date from the products CG needs
    anyway."""
    gradient = (w - start) @ h
    diag = torch.diag(h).view(1, -1)
    residual = -gradient * free  # minus the gradient on the free weights
    direction = residual / diag
    rz = (residual * direction).sum(dim=1, keepdim=True)
    first = rz.clone()
    for _ in range(iterations):
        if bool((rz <= tolerance * first).all()):
            break
        product = direction @ h
        curvature = (direction * product).sum(dim=1, keepdim=True)  # direction is 0 off the free entries
        alpha = torch.where(curvature > 0, rz / curvature.clamp_min(1e-30), torch.zeros_like(rz))
        w += alpha * direction
        gradient += alpha * product
        residual -= alpha * product * free
        z = residual / diag
        rz_next = (residual * z).sum(dim=1, keepdim=True)
        direction = z + (rz_next / rz.clamp_min(1e-30)) * direction
        rz = rz_next
    return w, gradient


@torch.no_grad()
def masked_least_squares(
    weight: Tensor,
    start: Tensor,
    hessian: Tensor,
    keep: Tensor,
    percdamp: float = 0.01,
    iterations: int = 15,
    tolerance: float = 1e-8,
) -> Tensor:
    """W minimising ||(W - start) X||^2 + lambda ||W - start||^2 row by row, with W = 0 where `keep`
    is False, from the initial guess `weight` (e.g. the sweep's). Columns the inputs never reach
    (zero Gram diagonal) keep their value from `weight`. Returns fp32, pruned entries exactly 0."""
    h, alive = damped_gram(hessian, percdamp)
    free = (keep.bool() & alive.view(1, -1)).float()  # dead inputs' weights are left as they are
    w = weight.float() * keep
    return conjugate_gradients(w, start.float(), h, free, iterations, tolerance)[0] * keep
