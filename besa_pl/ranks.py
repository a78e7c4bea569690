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


def sum_over_ranks(total: torch.Tensor, count: int) -> tuple[torch.Tensor, int]:
    """(the sum over ranks of `total`, of `count`): per-rank sums of samples combined. On one process
    nothing changes, bit for bit."""
    if world_size() == 1:
        return total, count
    counts = torch.tensor([float(count)], device=total.device, dtype=torch.float64)
    all_reduce_sum_(counts)
    return all_reduce_sum_(total), int(counts.item())


def all_reduce_sum_flat_(tensors: list[torch.Tensor]) -> None:
    """In place: each tensor's sum over ranks, in one all-reduce of them all flattened together."""
    if world_size() == 1 or not tensors:
        return
    flat = all_reduce_sum_(torch.cat([t.reshape(-1) for t in tensors]))
    offset = 0
    for tensor in tensors:
        tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
        offset += tensor.numel()
