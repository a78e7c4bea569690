"""Pruning on several devices with Lightning's DDP: calibration samples sharded over the ranks.

Every rank holds its share of the calibration samples (and only their activations); what the
method sums over samples is summed over ranks (`besa_pl.ranks`): input statistics and Grams, and
BESA's gradients at every step. Every rank therefore ends each block with the same masks and
weights; rank 0 alone writes.

Lightning's DDP wraps the LightningModule in DistributedDataParallel once, at setup. besa-pl's
trainable tensors change with every block (there are none at setup), so `BlockwiseDDPStrategy`
keeps Lightning's process group, launcher and checkpointing, and leaves out that wrapper.
"""

from __future__ import annotations

from lightning.pytorch.strategies import DDPStrategy


class BlockwiseDDPStrategy(DDPStrategy):
    """`--trainer.strategy ddp` for besa-pl: DDP without the DistributedDataParallel wrapper."""

    strategy_name = "besa_ddp"

    def configure_ddp(self) -> None:
        pass  # gradients are all-reduced by BESAPruner.training_step, once per step
