"""BlockwiseLoop: walks the decoder blocks in order inside one Trainer.fit.

One training epoch is one pass of the calibration samples through the current block. At the
end of a block's epochs its masks are burned in, the pruned outputs become the next block's
inputs, and the next block gets a fresh optimizer.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from lightning.pytorch import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException
from rich.console import Console

from ..export import FINISHED_MARKER, save_folder_atomic, sparsity_report, write_json_atomic
from ..packed import folder_bytes, fp16_bytes, save_packed
from ..report import report

console = Console(stderr=True)


class BlockwiseLoop(Callback):
    """Drives BESAPruner block by block and exports the pruned model when the last block is done.

    Args:
        export: write DIR/pruned (a Hugging Face folder) at the end.
    """

    def __init__(self, export: bool = True) -> None:
        self.export = export
        self._started = 0.0
        self._finished = False

    def setup(self, trainer, pruner, stage: str) -> None:
        if stage == "fit":
            epochs = pruner.hparams.epochs_per_block
            trainer.fit_loop.max_epochs = pruner.num_blocks * epochs if pruner.pruning else 0

    def on_train_start(self, trainer, pruner) -> None:
        if pruner.resumed:  # the fit loop's position is restored only now
            step = trainer.fit_loop.epoch_loop.batch_progress.current.completed
            step = step if step < trainer.num_training_batches else 0  # saved at a block's end
            console.print(f"resuming at block {pruner.block_index + 1}/{pruner.num_blocks} "
                          f"(a checkpoint taken {step} steps into it)")

    def on_train_epoch_start(self, trainer, pruner) -> None:
        self._started = self._started or time.perf_counter()
        pruner.ensure_prepared()

    def on_train_batch_end(self, trainer, pruner, outputs, batch, batch_idx) -> None:
        if trainer.received_sigterm:  # Lightning itself only checks at epoch end
            raise SIGTERMException

    def on_train_epoch_end(self, trainer, pruner) -> None:
        if (trainer.current_epoch + 1) % pruner.hparams.epochs_per_block != 0:
            return
        loss = trainer.callback_metrics.get("loss_epoch")
        entry = pruner.finish_block()
        if loss is not None:
            entry["loss"] = float(loss)
        elapsed = time.perf_counter() - self._started
        self._started = time.perf_counter()
        console.print(
            f"block {entry['block'] + 1}/{pruner.num_blocks}"
            + (f"  loss {entry['loss']:.4f}" if "loss" in entry else "")
            + f"  expected sparsity {entry['expected_sparsity']:.4f}"
            + f"  realised {entry['realised_sparsity']:.4f}  {elapsed:.1f}s"
        )
        pruner.log_dict({"block_realised_sparsity": entry["realised_sparsity"]}, on_epoch=True)
        if pruner.block_index < pruner.num_blocks:
            pruner.prepare_block()
        # A fresh optimizer for every block; after the last one, none (nothing left to save).
        trainer.strategy.setup_optimizers(trainer)

    def on_fit_end(self, trainer, pruner) -> None:
        root = Path(trainer.default_root_dir)
        if pruner.pruning and self.export:
            save_folder_atomic(pruner.model, pruner.tokenizer, root / "pruned")
            console.print(f"pruned model written to {root / 'pruned'}")
            if pruner.quant.enabled:
                packed = save_packed(pruner, root / "packed")
                pruner.results["bytes"] = export_sizes(pruner.model, packed)
                console.print(f"packed model written to {packed} ({pruner.results['bytes']['packed']:,} bytes; "
                              f"fp16 would be {pruner.results['bytes']['fp16']:,})")
        sparsity = sparsity_report(pruner)
        pruner.results["method"] = pruner.hparams.method
        pruner.results["target_sparsity"] = pruner.target_sparsity if pruner.pruning else 0.0
        pruner.results["realised_sparsity"] = sparsity["overall"]
        write_json_atomic(root / FINISHED_MARKER, sparsity)
        self._finished = True

    def teardown(self, trainer, pruner, stage: str) -> None:
        # After every callback's on_fit_end, so the evaluations are in the table.
        if stage == "fit" and self._finished:
            self._finished = False
            report(pruner.results, trainer.default_root_dir, console)
            if trainer.logger is not None:
                numbers = {k: v for k, v in pruner.results.items() if isinstance(v, float)}
                trainer.logger.log_metrics(numbers)
                trainer.logger.save()


def export_sizes(model, packed_folder) -> dict[str, int]:
    """Bytes of the weights in fp16 (dense or pruned: zeros still stored) and of the packed folder."""
    fp16 = fp16_bytes(model)
    return {"fp16": fp16, "pruned_fp16": fp16, "packed": folder_bytes(packed_folder)}


class SaveOnInterrupt(Callback):
    """Save where the run stands on Ctrl-C or SIGTERM, never on other errors.

    A failed resume or a bad setting must not overwrite the last good checkpoint. The file name
    contains "last", so `--ckpt_path last` picks it when it is newer than `last.ckpt`. (Not
    Lightning's OnExceptionCheckpoint: its presence makes every plain fit resume silently.)
    """

    def __init__(self, dirpath: str, filename: str = "last-interrupted") -> None:
        self.ckpt_path = os.path.join(dirpath, filename + ".ckpt")

    def on_exception(self, trainer, pruner, exception: BaseException) -> None:
        if isinstance(exception, (KeyboardInterrupt, SIGTERMException)) and pruner.cache is not None:
            trainer.save_checkpoint(self.ckpt_path, weights_only=False)
            console.print(f"interrupted: checkpoint saved to {self.ckpt_path}; resume with --ckpt_path last")
