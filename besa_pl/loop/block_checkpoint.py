"""BlockCheckpoint: `last.ckpt` after every finished block."""

from __future__ import annotations

import os

from lightning.pytorch.callbacks import ModelCheckpoint


class BlockCheckpoint(ModelCheckpoint):
    """A ModelCheckpoint that rewrites `last.ckpt` at the end of every block (epoch).

    ModelCheckpoint skips a save when no optimizer step happened since the previous one, which
    is every block of the one-shot methods; a block is the unit of progress here, not a step.
    """

    def __init__(self, dirpath: str) -> None:
        super().__init__(dirpath=dirpath, save_last=True, save_top_k=0)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        path = os.path.join(self.dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)
        trainer.save_checkpoint(path, weights_only=False)
        self.last_model_path = path
