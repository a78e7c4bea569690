"""The walk over the blocks inside one Trainer.fit: BlockwiseLoop, checkpoints, DDP, progress."""
