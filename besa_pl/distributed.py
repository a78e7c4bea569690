"""Pruning on several devices with Lightning's DDP: calibration samples sharded over the ranks.

Every rank holds its share of the calibration samples (and only their activations); what the
method sums over samples is summed over ranks: input statistics and Grams (`mean_over_ranks`),
and BESA's gradients at every step (`all_reduce_gradients`). Every rank therefore ends each
block with the same masks and weights; rank 0 alone writes.

Lightning's DDP wraps the LightningModule in DistributedDataParallel once, at setup. besa-pl's
trainable tensors change with every block (there are none at setup), so `BlockwiseDDPStrategy`
keeps Lightning's process group, launcher and checkpointing, and leaves out that wrapper.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy


class BlockwiseDDPStrategy(DDPStrategy):
    """`--trainer.strategy ddp` for besa-pl: DDP without the DistributedDataParallel wrapper."""

    strategy_name = "besa_ddp"

    def configure_ddp(self) -> None:
        pass  # gradients are all-reduced by BESAPruner.training_step, once per step


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


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
