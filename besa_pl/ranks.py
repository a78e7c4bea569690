"""What a rank sees of the others under DDP: its index, their count, and sums over all of them.

On one process every function is the identity (bit for bit), so the single-device path never
pays for, or depends on, torch.distributed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """In place: the sum over ranks (unchanged on one process)."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def mean_over_ranks(mean: torch.Tensor, count: int) -> tuple[torch.Tensor, int]:
    """Combine per-rank running means of `count` items into the mean over all ranks' items.
    On one process nothing changes, bit for bit."""
    if world_size() == 1:
        return mean, count
    total = torch.tensor([float(count)], device=mean.device, dtype=torch.float64)
    all_reduce_sum_(total)
    combined = all_reduce_sum_(mean * count)
    return combined / total.item(), int(total.item())


def all_reduce_gradients(parameters: list[torch.nn.Parameter]) -> None:
    """One all-reduce (sum) of all trainable tensors' gradients, flattened together."""
    if world_size() == 1:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    all_reduce_sum_(flat)
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()
