"""What every besa-pl Trainer needs, for the CLI and for Python users alike."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch import Callback

from .callbacks import BlockCheckpoint, BlockwiseLoop, SaveOnInterrupt
from .checkpoint import AtomicCheckpointIO


def required_callbacks(root: str | Path) -> list[Callback]:
    """Checkpoint after every block, and on Ctrl-C / SIGTERM, under ROOT/checkpoints."""
    checkpoints = Path(root) / "checkpoints"
    return [BlockCheckpoint(dirpath=str(checkpoints)), SaveOnInterrupt(dirpath=str(checkpoints))]


def complete_callbacks(callbacks, root: str | Path) -> list[Callback]:
    """BlockwiseLoop first (unless given), then the user's callbacks, then the checkpointing ones."""
    callbacks = list(callbacks or [])
    if not any(isinstance(c, BlockwiseLoop) for c in callbacks):
        callbacks.insert(0, BlockwiseLoop())
    return callbacks + required_callbacks(root)


def complete_plugins(plugins) -> list:
    """The user's plugins plus atomic checkpoint writing."""
    return list(plugins or []) + [AtomicCheckpointIO()]


def make_trainer(root: str | Path, callbacks: list[Callback] = (), **trainer_kwargs) -> L.Trainer:
    """A Trainer for BESAPruner: BlockwiseLoop first, evaluation callbacks, atomic checkpoints."""
    trainer_kwargs.setdefault("num_sanity_val_steps", 0)
    trainer_kwargs.setdefault("enable_model_summary", False)
    return L.Trainer(
        default_root_dir=str(root),
        callbacks=complete_callbacks(callbacks, root),
        plugins=complete_plugins(trainer_kwargs.pop("plugins", None)),
        **trainer_kwargs,
    )
