"""Pruning on several devices with Lightning's DDP: calibration samples sharded over the ranks.

Every rank holds its share of the calibration samples (and only their activations); what the
method sums over samples is summed over ranks (`besa_pl.ranks`): input statistics and Grams, and
BESA's gradients at every step. Every rank therefore ends each block with the same masks and
weights; rank 0 alone writes.

Lightning's DDP wraps the LightningModule in DistributedDataParallel once, at setup. besa-pl's
trainable tensors change with every block (there are none at setup), so `BlockwiseDDPStrategy`
keeps Lightning's process group, launcher and checkpointing, and leaves out that wrapper (how it
does so relies on Lightning internals: `besa_pl.compat.WithoutDistributedDataParallel`).
"""

from __future__ import annotations

from lightning.pytorch.strategies import DDPStrategy

from besa_pl.compat import WithoutDistributedDataParallel


class BlockwiseDDPStrategy(WithoutDistributedDataParallel, DDPStrategy):
    """`--trainer.strategy ddp` for besa-pl: DDP without the DistributedDataParallel wrapper; the
    gradients are all-reduced by BESAPruner.training_step, once per step."""

    strategy_name = "besa_ddp"
