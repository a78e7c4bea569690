"""BlockProgress: one progress bar for the whole pruning run, in blocks rather than epochs.

    block 12/30  loss 0.0213  expected sparsity 0.5001  ━━━━━━━━━━━━━━━━━━━━━━  1412/3840  0:03:10  ETA 0:07:02

(A block is a Trainer epoch inside; the user should not need to know.) The per-block summary
lines of BlockwiseLoop print above the bar.
"""

from __future__ import annotations

import sys

from lightning.pytorch.callbacks import ProgressBar
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class BlockProgress(ProgressBar):
    def __init__(self) -> None:
        super().__init__()
        self._enabled = True
        self._progress: Progress | None = None
        self._task = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer, pruner) -> None:
        if not self._enabled or not pruner.settings.pruning or not trainer.is_global_zero:
            return
        steps = trainer.num_training_batches
        blocks = pruner.num_blocks
        done = pruner.block_index * steps
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=Console(file=sys.stderr),
            transient=True,
        )
        self._progress.start()
        self._task = self._progress.add_task(self._describe(pruner, {}), total=blocks * steps, completed=done)

    def on_train_batch_end(self, trainer, pruner, outputs, batch, batch_idx) -> None:
        if self._progress is not None:
            metrics = {k: float(v) for k, v in trainer.progress_bar_metrics.items()}
            self._progress.update(self._task, advance=1, description=self._describe(pruner, metrics))

    def on_train_epoch_end(self, trainer, pruner) -> None:
        if self._progress is not None:  # the block's steps, exactly, whatever a resume skipped
            steps = trainer.num_training_batches
            self._progress.update(
                self._task, completed=pruner.block_index * steps, description=self._describe(pruner, {})
            )

    def on_train_end(self, trainer, pruner) -> None:
        self._stop()

    def on_exception(self, trainer, pruner, exception) -> None:
        self._stop()

    def _stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    @staticmethod
    def _describe(pruner, metrics: dict[str, float]) -> str:
        block = min(pruner.block_index + 1, pruner.num_blocks)
        text = f"block {block}/{pruner.num_blocks}"
        if "loss_step" in metrics:
            text += f"  loss {metrics['loss_step']:.4f}"
        if "expected_sparsity" in metrics:
            text += f"  expected sparsity {metrics['expected_sparsity']:.4f}"
        return text
