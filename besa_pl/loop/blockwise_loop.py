"""BlockwiseLoop: the walk over the decoder blocks, inside one Trainer.fit.

    capture what block 0 receives (hidden states and every keyword argument)
    for each block:                                  (one or more Trainer epochs per block)
        load      its weights onto the device                          begin_block
        statistics: the reference pass gives targets and input norms   begin_block
        train     BESA: the Trainer's steps learn the logits           BESAPruner.training_step
          or one-shot: magnitude / Wanda / SparseGPT prune now         begin_block
        burn in   the final masks                                      end_block
        reconstruct the kept weights (model.reconstruct)               end_block
        forward   the pruned outputs are the next block's inputs       end_block
        write     the block's shard of the pruned folder               end_block
        free      its weights                                          end_block
    write the rest of the model and the index; rename the folder       on_fit_end

A checkpoint after every block holds where the loop stands (never base weights); a resumed run
replays the calibration data through the finished blocks, read back from their shards.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from besa_pl.atomic import write_json_atomic
from besa_pl.besa.block import BESABlock
from besa_pl.closedform.obs import QuantGrid
from besa_pl.closedform.reconstruction import reconstruct_block
from besa_pl.compat import steps_done_in_epoch
from besa_pl.console import console, stage
from besa_pl.errors import BesaError
from besa_pl.eval.model_card import model_card, write_model_card
from besa_pl.eval.plots import save_allocation_plot
from besa_pl.eval.report import environment, report
from besa_pl.loop.checkpoint import check_resume, loop_state
from besa_pl.loop.nm_check import check_n_of_m
from besa_pl.loop.sparsity_report import FINISHED_MARKER, sparsity_report
from besa_pl.models.activations import capture_block_inputs, kwargs_to, run_block
from besa_pl.models.loading import prunable_linears, torch_dtype
from besa_pl.models.weights import ShardWriter, WeightStore
from besa_pl.oneshot.baselines import check_shapes, prune_linear
from besa_pl.oneshot.importance import reference_pass, score_linears
from besa_pl.quant.packed import PackedWriter
from besa_pl.quant.quantizer import burn_in, rtn_params


@dataclass
class BlockWork:
    """What the loop holds for the block being pruned, from `begin_block` to `end_block`."""

    index: int
    dense: dict[str, torch.Tensor] | None  # W0 of every linear, for the reconstruction (None: no reconstruction)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # keep-masks, once final
    qparams: dict[str, tuple] = field(default_factory=dict)  # quantization scales and zeros, once final
    clipping: dict[str, tuple] | None = None  # BESA's learned clipping strengths (joint quantization)
    started: float = field(default_factory=time.perf_counter)


class BlockwiseLoop(Callback):
    """Drives BESAPruner block by block and writes the pruned model as it goes.

    Where the run stands is known in one place: `pruner.records`, one per finished block; the block
    being pruned is `pruner.block_index` (= the number of finished blocks), and `self.work` is its
    work while it is open. Lightning's epoch counter only says when a block opens and closes.
    """

    def __init__(self) -> None:
        self._resume: dict | None = None
        self.work: BlockWork | None = None
        self._started = 0.0
        self._finished = False

    # ------------------------------------------------------------ Lightning
    def setup(self, trainer, pruner, stage: str) -> None:
        if stage == "fit":
            epochs = pruner.settings.epochs_per_block
            trainer.fit_loop.max_epochs = pruner.num_blocks * epochs if pruner.settings.pruning else 0

    def on_load_checkpoint(self, trainer, pruner, checkpoint: dict) -> None:
        self._resume = check_resume(checkpoint, pruner, trainer.datamodule)

    def on_train_start(self, trainer, pruner) -> None:
        self.start(trainer, pruner)

    def on_train_epoch_start(self, trainer, pruner) -> None:
        self._ensure_begun(trainer, pruner)

    def on_train_batch_start(self, trainer, pruner, batch, batch_idx) -> None:
        self._ensure_begun(trainer, pruner)  # a run resumed mid-epoch gets no on_train_epoch_start

    def _ensure_begun(self, trainer, pruner) -> None:
        if self.work is None:
            # Lightning's epochs and the finished blocks must agree, or a resume went wrong.
            expected = trainer.current_epoch // pruner.settings.epochs_per_block
            if expected != pruner.block_index:
                raise RuntimeError(
                    f"epoch {trainer.current_epoch} belongs to block {expected}, "
                    f"but {pruner.block_index} blocks are finished"
                )
            self.begin_block(trainer, pruner)

    def on_train_batch_end(self, trainer, pruner, outputs, batch, batch_idx) -> None:
        if trainer.received_sigterm:  # Lightning itself only checks at epoch end
            raise SIGTERMException

    def on_train_epoch_end(self, trainer, pruner) -> None:
        self._ensure_begun(trainer, pruner)
        if (trainer.current_epoch + 1) % pruner.settings.epochs_per_block == 0:
            loss = trainer.callback_metrics.get("loss_epoch")
            self.end_block(trainer, pruner, float(loss) if loss is not None else None)

    def on_save_checkpoint(self, trainer, pruner, checkpoint: dict) -> None:
        checkpoint["besa"] = loop_state(pruner.records, pruner, trainer.datamodule)

    def on_fit_end(self, trainer, pruner) -> None:
        self.finish(trainer, pruner)

    def teardown(self, trainer, pruner, stage: str) -> None:
        # After every callback's on_fit_end, so the evaluations are in the table.
        if stage == "fit" and self._finished:
            self._finished = False
            report(pruner.results, trainer.default_root_dir, console)
            if pruner.settings.pruning:
                card = write_card(Path(trainer.default_root_dir), pruner, trainer.datamodule)
                console.print(f"model card written to {card}")
            if trainer.logger is not None:
                numbers = {k: v for k, v in pruner.results.items() if isinstance(v, float)}
                trainer.logger.log_metrics(numbers)
                trainer.logger.save()
        if pruner.source is not None:
            pruner.source.close_evaluation()

    # ---------------------------------------------------------------- steps
    def start(self, trainer, pruner) -> None:
        """Capture block 0's inputs; on resume, replay the finished blocks from their shards."""
        s, source = pruner.settings, pruner.open_source()
        root = Path(trainer.default_root_dir)
        device = trainer.strategy.root_device
        tokens = trainer.datamodule.tokens
        check_shapes(s, source.blocks)
        activation_dtype = torch_dtype(s.activation_dtype or s.dtype)
        stage(f"capture: what block 0 receives for {tokens.shape[0]} samples of {tokens.shape[1]} tokens")
        pruner.cache = capture_block_inputs(
            source.model, tokens, s.dense_trajectory, activation_dtype, device="cpu", pin=device.type == "cuda"
        )
        # X_p, the targets and (dense trajectory) X_fp, each N/ranks x T x H: see docs/memory.md.
        buffers = 3 if s.dense_trajectory else 2
        pruner.results["activation_bytes_per_rank"] = (
            buffers * pruner.cache.inputs.numel() * pruner.cache.inputs.element_size()
        )
        resume = self._resume
        self._resume = None
        main = trainer.is_global_zero  # under DDP rank 0 writes, the others read
        self.writer = ShardWriter(root / "pruned", source.num_blocks + 1, fresh=resume is None, enabled=main)
        self.packed = (
            PackedWriter(root / "packed", source.num_blocks + 1, s.quant, fresh=resume is None, enabled=main)
            if s.quant.enabled
            else None
        )
        pruner.records = []
        self.work = None
        self._pending_state = None
        if resume is not None:
            self.replay(trainer, pruner, resume)
        self._started = time.perf_counter()

    @torch.no_grad()
    def replay(self, trainer, pruner, resume: dict) -> None:
        """Rebuild the activations of a resumed run by forwarding through the finished blocks."""
        s, source, cache = pruner.settings, pruner.source, pruner.cache
        device = trainer.strategy.root_device
        records = list(resume["block_logs"])
        finished = WeightStore(self.writer.staging)
        for index, record in enumerate(records):
            path = self.writer.staging / record["shard"]
            if not path.exists() or file_digest(path) != record["digest"]:
                raise BesaError(
                    f"ckpt_path: the finished block {index}'s shard {path} is missing or changed; "
                    "start again without --ckpt_path (with --overwrite true)"
                )
            kwargs = cache.block_kwargs[index]
            if s.dense_trajectory:  # the dense model's activations go through the dense block
                run_block(source.load_block(index, device), cache.dense_inputs, kwargs, device, out=cache.dense_inputs)
                source.release_block(index)
            run_block(source.load_block(index, device, finished), cache.inputs, kwargs, device, out=cache.inputs)
            source.release_block(index)
        pruner.records = records
        self._pending_state = resume["block_state"]
        step = steps_done_in_epoch(trainer)
        step = step if step < trainer.num_training_batches else 0
        console.print(
            f"resuming at block {pruner.block_index + 1}/{source.num_blocks} (a checkpoint taken {step} steps into it)"
        )

    @torch.no_grad()
    def begin_block(self, trainer, pruner) -> None:
        """Load the block, run the reference pass, and set up its training (BESA) or prune it (one-shot)."""
        s, source, cache = pruner.settings, pruner.source, pruner.cache
        device = trainer.strategy.root_device
        index = pruner.block_index
        block = source.load_block(index, device)
        kwargs = cache.block_kwargs[index]
        linears = prunable_linears(block)
        # W0 for the reconstruction after the masks are final.
        dense = {n: lin.weight.detach().clone() for n, lin in linears.items()} if s.reconstruction != "none" else None
        self.work = BlockWork(index, dense)
        outputs, stats = reference_pass(block, cache.inputs, kwargs, device, gram=s.needs_hessian)
        if s.dense_trajectory:  # the target is the dense model's own activation (also the next X_fp)
            outputs = run_block(block, cache.dense_inputs, kwargs, device)
        cache.targets = outputs if s.method == "besa" or s.dense_trajectory else None
        if s.method == "besa":
            scores = score_linears(block, stats, s.importance, s.importance_damping)
            state, self._pending_state = self._pending_state, None
            pruner.begin_training(BESABlock(block, kwargs_to(kwargs, device), scores, s), state)
        else:
            self._prune_one_shot(pruner, linears, stats, index)

    def _prune_one_shot(self, pruner, linears, stats, index: int) -> None:
        s = pruner.settings
        # SparseGPT quantizes inside its own sweep (GPTQ); the others round to nearest, unless the
        # reconstruction quantizes them later.
        in_sweep = s.quant.enabled and s.method == "sparsegpt" and s.reconstruction == "none"
        for name, linear in linears.items():
            grid = QuantGrid(s.quant.bits, s.quant.group_size) if in_sweep else None
            keep, qparams = prune_linear(
                s.method,
                linear,
                stats[name],
                s.sparsity,
                s.granularity,
                s.nm,
                grid,
                log=lambda msg, name=name: console.print(f"[yellow]block {index} {name}:[/] {msg}"),
                percdamp=s.damping,
            )
            self.work.masks[name] = keep
            if qparams is None and s.quant.enabled and s.reconstruction == "none":
                qparams = rtn_params(linear.weight, s.quant.bits, s.quant.group_size)
                burn_in(linear.weight, keep, s.quant, *qparams)
            if qparams is not None:
                self.work.qparams[name] = qparams

    @torch.no_grad()
    def end_block(self, trainer, pruner, loss: float | None) -> None:
        """Burn in, reconstruct, forward, write and free the current block."""
        s, source, cache = pruner.settings, pruner.source, pruner.cache
        device = trainer.strategy.root_device
        work = self.work
        index = work.index
        block = source.blocks[index]
        learned, expected, column_weights = None, s.target, None
        if pruner.current is not None:  # BESA: the hard masks of the learned rates (or scales), burned in
            column_weights = pruner.current.column_weights()  # N:M: the learned scales, no rates
            if column_weights is None:
                learned = {name: rate_summary(r) for name, r in pruner.current.learned_rates().items()}
            expected = pruner.current.expected_sparsity().item()
            work.clipping = pruner.current.clipping_strengths()
            work.masks, work.qparams = pruner.current.finalize()
            pruner.end_training()
        if s.reconstruction != "none":
            grids = (
                {
                    name: QuantGrid(s.quant.bits, s.quant.group_size, *(work.clipping or {}).get(name, (None, None)))
                    for name in work.masks
                }
                if s.quant.enabled
                else None
            )
            work.qparams = reconstruct_block(
                block,
                work.dense,
                work.masks,
                cache.inputs,
                cache.dense_inputs if s.dense_trajectory else None,
                cache.block_kwargs[index],
                device,
                s,
                grids,
                log=lambda msg: console.print(f"[yellow]block {index} reconstruction:[/] {msg}"),
                column_weights=column_weights,
            )
        n_of_m = check_n_of_m(block, *s.nm, index) if s.nm is not None else None
        if s.dense_trajectory:
            cache.dense_inputs = cache.targets
        cache.targets = None
        run_block(block, cache.inputs, cache.block_kwargs[index], device, out=cache.inputs)
        shard = self.writer.write(index, prefixed(block.state_dict(), source.block_prefix(index)))
        if self.packed is not None:
            self.packed.write_block(index, block, source.block_prefix(index), work.masks, work.qparams)
        record = block_record(index, block, expected, loss, learned, shard, digest=trainer.is_global_zero)
        if n_of_m is not None:
            record["n_of_m"] = n_of_m
        if column_weights is not None:
            record["learned_scales"] = {name: scale_summary(w) for name, w in column_weights.items()}
        source.release_block(index)
        pruner.records.append(record)
        self.work = None
        elapsed = time.perf_counter() - work.started
        console.print(
            f"block {index + 1}/{source.num_blocks}"
            + (f"  loss {loss:.4f}" if loss is not None else "")
            + f"  expected sparsity {expected:.4f}  realised {record['realised_sparsity']:.4f}  {elapsed:.1f}s"
        )
        pruner.log("block_realised_sparsity", record["realised_sparsity"], on_epoch=True)

    def finish(self, trainer, pruner) -> None:
        """Write the rest of the model and rename the folder into place (rank 0); the others wait."""
        if trainer.is_global_zero:
            self.write_outputs(trainer, pruner)
        trainer.strategy.barrier("pruned folder written")
        self._finished = trainer.is_global_zero

    def write_outputs(self, trainer, pruner) -> None:
        """The outer shard, the index and the rename; packed/, allocation.png; sparsity.json marks the end."""
        s, source = pruner.settings, pruner.open_source()
        root = Path(trainer.default_root_dir)
        pruner.results["method"] = s.method
        pruner.results["variant"] = s.variant()
        pruner.results["target_sparsity"] = s.target if s.pruning else 0.0
        pruner.results["settings"] = {k.removeprefix("model."): v for k, v in s.flat().items()}
        pruner.results["environment"] = environment()
        if not s.pruning:
            pruner.results["realised_sparsity"] = 0.0
            return
        outer = dict(source.outer_tensors())
        self.writer.write(source.num_blocks, outer)
        self.writer.finish(source.model.config, source.tokenizer)
        console.print(f"pruned model written to {root / 'pruned'}")
        if self.packed is not None:
            packed = self.packed.finish(outer, source.model.config, source.tokenizer, source.dtype)
            pruner.results["bytes"] = {"fp16": fp16_bytes(root / "pruned"), "packed": packed_bytes(packed)}
            console.print(
                f"packed model written to {packed} ({pruner.results['bytes']['packed']:,} bytes; "
                f"fp16 would be {pruner.results['bytes']['fp16']:,})"
            )
        sparsity = sparsity_report(pruner.records, s)
        pruner.results["realised_sparsity"] = sparsity["overall"]
        plot = save_allocation_plot(
            pruner.records, root / "allocation.png", f"{s.method} {s.target:.0%}", trainer.logger
        )
        console.print(f"allocation plot written to {plot}")
        write_json_atomic(root / FINISHED_MARKER, sparsity)


def write_card(root: Path, pruner, datamodule) -> Path:
    """pruned/README.md, from this run's results, sparsity.json and calibration."""
    calibration = {key: getattr(datamodule, key) for key in ("dataset", "nsamples", "seqlen", "seed", "source")}
    sparsity = json.loads((root / FINISHED_MARKER).read_text())
    return write_model_card(root / "pruned", model_card(pruner.pretrained, pruner.results, sparsity, calibration))


def rate_summary(rates: torch.Tensor) -> dict:
    """A layer's learned per-row rates in brief: mean, range, and a 100-bin histogram over [0, 1]."""
    rates = rates.float()
    return {
        "mean": float(rates.mean()),
        "min": float(rates.min()),
        "max": float(rates.max()),
        "histogram": torch.histc(rates, bins=100, min=0.0, max=1.0).int().tolist(),
    }


def scale_summary(column_weight: torch.Tensor) -> dict:
    """A layer's learned channel scales (exp(log_scale), the square root of the saliency factor) in brief."""
    scales = column_weight.float().sqrt()
    return {"mean": float(scales.mean()), "min": float(scales.min()), "max": float(scales.max())}


def prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + name: tensor for name, tensor in state.items()}


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(16 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@torch.no_grad()
def block_record(index: int, block, expected: float, loss: float | None, learned, shard: Path, digest: bool) -> dict:
    """What sparsity.json and the checkpoint keep of a finished block (small: no weights)."""
    linears = prunable_linears(block)
    zeros = {name: int((linear.weight == 0).sum()) for name, linear in linears.items()}
    weights = sum(linear.weight.numel() for linear in linears.values())
    record = {
        "block": index,
        "expected_sparsity": expected,
        "realised_sparsity": sum(zeros.values()) / weights,
        "weights": weights,
        "layers": {name: zeros[name] / linears[name].weight.numel() for name in linears},
        "shard": shard.name,
        "digest": file_digest(shard) if digest else None,
    }  # only rank 0 saves checkpoints
    if loss is not None:
        record["loss"] = loss
    if learned is not None:
        record["learned_rates"] = learned
    return record


def fp16_bytes(folder: Path) -> int:
    return 2 * WeightStore(folder).numel()


def packed_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())


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
