"""What every besa-pl Trainer needs, for the CLI and for Python users alike."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch import Callback

from besa_pl.callbacks import BlockCheckpoint, BlockwiseLoop, SaveOnInterrupt
from besa_pl.errors import BesaError
from besa_pl.loop.checkpoint import AtomicCheckpointIO
from besa_pl.loop.ddp import BlockwiseDDPStrategy


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


def blockwise_strategy(strategy):
    """Lightning's "ddp" (or a DDPStrategy) becomes BlockwiseDDPStrategy, with the same settings."""
    from lightning.pytorch.strategies import DDPStrategy

    if isinstance(strategy, str) and strategy in ("ddp", "besa_ddp"):
        return BlockwiseDDPStrategy()
    if isinstance(strategy, DDPStrategy) and not isinstance(strategy, BlockwiseDDPStrategy):
        raise BesaError(f"trainer.strategy={type(strategy).__name__}: give the name ddp (or a "
                        "besa_pl.loop.ddp.BlockwiseDDPStrategy), which prunes data-parallel")
    if isinstance(strategy, str) and strategy not in ("auto", "single_device"):
        raise BesaError(f"trainer.strategy={strategy}: besa-pl runs on one device (auto) or with ddp; "
                        "use --trainer.strategy ddp")
    return strategy


def latest_checkpoint(root: str | Path) -> str | None:
    """The newer of ROOT/checkpoints/last.ckpt and last-interrupted.ckpt (what `--ckpt_path last` means),
    or None when the run stopped before its first checkpoint."""
    checkpoints = Path(root) / "checkpoints"
    found = [p for p in (checkpoints / "last.ckpt", checkpoints / "last-interrupted.ckpt") if p.exists()]
    return str(max(found, key=lambda p: p.stat().st_mtime_ns)) if found else None


def complete_plugins(plugins) -> list:
    """The user's plugins plus atomic checkpoint writing."""
    return list(plugins or []) + [AtomicCheckpointIO()]


def make_trainer(root: str | Path, callbacks: list[Callback] = (), **trainer_kwargs) -> L.Trainer:
    """A Trainer for BESAPruner: BlockwiseLoop first, evaluation callbacks, atomic checkpoints."""
    trainer_kwargs.setdefault("num_sanity_val_steps", 0)
    trainer_kwargs.setdefault("enable_model_summary", False)
    trainer_kwargs.setdefault("use_distributed_sampler", False)  # each rank holds its own samples already
    trainer_kwargs["strategy"] = blockwise_strategy(trainer_kwargs.get("strategy", "auto"))
    return L.Trainer(
        default_root_dir=str(root),
        callbacks=complete_callbacks(callbacks, root),
        plugins=complete_plugins(trainer_kwargs.pop("plugins", None)),
        **trainer_kwargs,
    )
