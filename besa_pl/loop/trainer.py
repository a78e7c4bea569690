"""What every besa-pl Trainer needs, for the CLI and for Python users alike."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ProgressBar

from besa_pl.callbacks import BlockCheckpoint, BlockwiseLoop, SaveOnInterrupt
from besa_pl.errors import BesaError
from besa_pl.loop.checkpoint import AtomicCheckpointIO
from besa_pl.loop.ddp import BlockwiseDDPStrategy
from besa_pl.loop.progress import BlockProgress

# Trainer settings of every besa-pl run unless given: one device (Lightning's "auto" would take
# every GPU with its own DDP; besa-pl's runs on several devices only with --trainer.strategy ddp),
# no sanity validation or model summary (nothing to validate or summarise before the first block),
# and no distributed sampler (each rank holds its own share of the samples already).
TRAINER_DEFAULTS = {
    "devices": 1,
    "num_sanity_val_steps": 0,
    "enable_model_summary": False,
    "use_distributed_sampler": False,
}


def required_callbacks(root: str | Path) -> list[Callback]:
    """Checkpoint after every block, and on Ctrl-C / SIGTERM, under ROOT/checkpoints."""
    checkpoints = Path(root) / "checkpoints"
    return [BlockCheckpoint(dirpath=str(checkpoints)), SaveOnInterrupt(dirpath=str(checkpoints))]


def complete_callbacks(callbacks, root: str | Path, progress: bool = True) -> list[Callback]:
    """BlockwiseLoop first (unless given), then the user's callbacks, then the checkpointing ones and,
    with `progress` and no progress bar given, the block progress bar."""
    callbacks = list(callbacks or [])
    if not any(isinstance(c, BlockwiseLoop) for c in callbacks):
        callbacks.insert(0, BlockwiseLoop())
    callbacks += required_callbacks(root)
    if progress and not any(isinstance(c, ProgressBar) for c in callbacks):
        callbacks.append(BlockProgress())
    return callbacks


def blockwise_strategy(strategy):
    """Lightning's "ddp" (or a DDPStrategy) becomes BlockwiseDDPStrategy, with the same settings."""
    from lightning.pytorch.strategies import DDPStrategy

    if isinstance(strategy, str) and strategy in ("ddp", "besa_ddp"):
        return BlockwiseDDPStrategy()
    if isinstance(strategy, DDPStrategy) and not isinstance(strategy, BlockwiseDDPStrategy):
        raise BesaError(
            f"trainer.strategy={type(strategy).__name__}: give the name ddp (or a "
            "besa_pl.loop.ddp.BlockwiseDDPStrategy), which prunes data-parallel"
        )
    if isinstance(strategy, str) and strategy not in ("auto", "single_device"):
        raise BesaError(
            f"trainer.strategy={strategy}: besa-pl runs on one device (auto) or with ddp; use --trainer.strategy ddp"
        )
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
    """A Trainer for BESAPruner as `besa-pl fit` makes it: the CLI's defaults (TRAINER_DEFAULTS),
    BlockwiseLoop first, the user's callbacks, checkpoints after every block, written atomically."""
    for key, value in TRAINER_DEFAULTS.items():
        trainer_kwargs.setdefault(key, value)
    progress = trainer_kwargs.get("enable_progress_bar") is not False
    trainer_kwargs["strategy"] = blockwise_strategy(trainer_kwargs.get("strategy", "auto"))
    return L.Trainer(
        default_root_dir=str(root),
        callbacks=complete_callbacks(callbacks, root, progress),
        plugins=complete_plugins(trainer_kwargs.pop("plugins", None)),
        **trainer_kwargs,
    )
