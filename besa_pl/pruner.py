"""BESAPruner: the LightningModule that owns the model, the activation cache and the current block."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch

from .activations import ActivationCache, capture_block_inputs, kwargs_to, run_block
from .allocation import candidate_rates, smoothing_band
from .baselines import check_structure, parse_structure, prune_linear
from .block import BESABlock
from .checkpoint import ResumeState, block_fingerprint_settings, dump_state, load_state, model_fingerprint
from .errors import BesaError
from .importance import InputStatistics, importance_scores, row_ranks
from .models import decoder_blocks, load_model, prunable_linears
from .obs import QuantGrid
from .quant import SUPPORTED_BITS, QuantConfig, burn_in, rtn_params
from .reconstruction import RECONSTRUCT, REFERENCES, reconstruct_block

log = logging.getLogger("besa_pl")

METHODS = ("besa", "wanda", "sparsegpt", "magnitude", "dense")
GRANULARITIES = ("row", "layer")
IMPORTANCE = ("wanda", "magnitude", "sparsegpt")


def _choice(setting: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise BesaError(f"{setting}={value}: unknown value; use one of {', '.join(allowed)}")


class BESAPruner(L.LightningModule):
    """Prunes a causal LM block by block. Trainable parameters exist only for the current block.

    Args:
        pretrained: hub id, local HF folder, .gguf file, or `demo` (SmolLM2-135M-Instruct).
        method: besa | wanda | sparsegpt | magnitude | dense (no pruning: the dense row).
        sparsity: target unstructured sparsity s*, 0 < s < 1.
        granularity: row (one allocation per output row, the paper) | layer (one per layer).
        structure: N:M semi-structured sparsity such as "2:4" (one-shot methods only).
        importance: ranking metric BESA learns over: wanda (default) | magnitude | sparsegpt.
        smoothing: softmax(sigmoid(logits)) as in the official code; false = softmax(logits).
        candidate_grid: centered (grid centred at the target; = the official grid at 0.5) | uniform.
        num_candidates: number of candidate rates (101 in the official code).
        penalty_weight: lambda of the sparsity penalty (5).
        penalty_form: relative ((s-s*)/s*)^2, the code | absolute (s-s*)^2, the paper.
        target_mode: pruned_input (dense block on pruned inputs, the code) | dense_trajectory.
        optimizer: prodigy (default) | adamw. lr: 1.0 for prodigy, ~1e-2 for adamw.
        d_coef: Prodigy's d_coef (5 for 7B/13B row-wise in the paper).
        epochs_per_block: passes over the calibration samples per block (1).
        dtype: weights' dtype: float32 | bfloat16 | float16.
        quant: joint weight quantization (`--model.quant.bits 4 --model.quant.group_size 128`).
        exact_sparsity: shift a block's learned rates by one common amount so it ends exactly at the
            target; false = the official code's floor(C * alpha) (about 0.3% below the target).
        smoothing_scale: s in softmax(s * sigmoid(z)); 1 = the official code, whose rates stay within
            about +/-12% of the grid's centre; larger s lets them move further.
        reconstruct: none (the paper: kept weights keep their dense values) | obs (re-solve the kept
            weights after the masks are final, true-sequentially, with the OBS update).
        reconstruct_reference: target (each linear matches its input-output in the forward that made
            the block's target: corrects earlier sublayers' error too) | layer (SparseGPT's own update).
    """

    def __init__(
        self,
        pretrained: str = "demo",
        method: str = "besa",
        sparsity: float = 0.5,
        granularity: str = "row",
        structure: str | None = None,
        importance: str = "wanda",
        smoothing: bool = True,
        candidate_grid: str = "centered",
        num_candidates: int = 101,
        penalty_weight: float = 5.0,
        penalty_form: str = "relative",
        target_mode: str = "pruned_input",
        optimizer: str = "prodigy",
        lr: float = 1.0,
        d_coef: float = 5.0,
        epochs_per_block: int = 1,
        dtype: str = "float32",
        quant: QuantConfig = QuantConfig(),
        exact_sparsity: bool = True,
        smoothing_scale: float = 1.0,
        reconstruct: str = "none",
        reconstruct_reference: str = "target",
    ) -> None:
        super().__init__()
        _choice("model.method", method, METHODS)
        _choice("model.granularity", granularity, GRANULARITIES)
        _choice("model.importance", importance, IMPORTANCE)
        _choice("model.candidate_grid", candidate_grid, ("centered", "uniform"))
        _choice("model.penalty_form", penalty_form, ("relative", "absolute"))
        _choice("model.target_mode", target_mode, ("pruned_input", "dense_trajectory"))
        _choice("model.optimizer", optimizer, ("prodigy", "adamw"))
        _choice("model.reconstruct", reconstruct, RECONSTRUCT)
        _choice("model.reconstruct_reference", reconstruct_reference, REFERENCES)
        if not smoothing_scale > 0:
            raise BesaError(f"model.smoothing_scale={smoothing_scale}: must be positive (1 = the official code)")
        if not 0.0 < sparsity < 1.0:
            raise BesaError(f"model.sparsity={sparsity}: must be strictly between 0 and 1 (e.g. 0.5)")
        if num_candidates < 2:
            raise BesaError(f"model.num_candidates={num_candidates}: must be at least 2")
        if epochs_per_block < 1:
            raise BesaError(f"model.epochs_per_block={epochs_per_block}: must be at least 1")
        try:
            self.nm = parse_structure(structure)
        except ValueError as error:
            raise BesaError(f"model.structure={structure}: write N:M with N < M, e.g. 2:4") from error
        if self.nm is not None:
            n, m = self.nm
            if not 0 < n < m:
                raise BesaError(f"model.structure={structure}: write N:M with 0 < N < M, e.g. 2:4")
            if method == "besa":
                raise BesaError("model.structure: N:M sparsity works with --model.method magnitude, wanda or sparsegpt, not besa")
        if quant.enabled and quant.bits not in SUPPORTED_BITS:
            raise BesaError(f"model.quant.bits={quant.bits}: use one of {', '.join(map(str, SUPPORTED_BITS))}")
        if quant.group_size is not None and quant.group_size < 1:
            raise BesaError(f"model.quant.group_size={quant.group_size}: must be a positive number of input columns")
        self.quant = quant
        self.rates = candidate_rates(sparsity, num_candidates, candidate_grid)
        if smoothing:
            low, high = smoothing_band(self.rates, smoothing_scale)
            if not low + 0.01 <= sparsity <= high - 0.01:
                raise BesaError(
                    f"model.sparsity={sparsity} is outside [{low:.3f}, {high:.3f}], what sigmoid smoothing can reach on the "
                    f"{candidate_grid} grid; use --model.candidate_grid centered, a larger --model.smoothing_scale "
                    "or --model.smoothing false"
                )
        self.save_hyperparameters()
        self.strict_loading = False  # checkpoints never hold the base model's weights
        self.automatic_optimization = False  # one or two optimizers (logits, clipping) per block
        self.model = None
        self._tokenizer = None
        self.cache: ActivationCache | None = None
        self.block_index = 0
        self.current: BESABlock | None = None
        self.prepared = False
        self.masks: dict[int, dict[str, torch.Tensor]] = {}
        self.learned: dict[int, dict[str, dict[str, float]]] = {}
        self.quant_params: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.clipping: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]] | None] = {}
        self.dense_weights: dict[str, torch.Tensor] | None = None
        self.block_logs: list[dict[str, Any]] = []
        self.results: dict[str, Any] = {}
        self._resume: ResumeState | None = None
        self.resumed = False
        self._fingerprint: str | None = None

    # ----------------------------------------------------------------- loading
    def _load(self) -> None:
        if self.model is None:
            self.model, self._tokenizer = load_model(self.hparams.pretrained, self.hparams.dtype)
            blocks = decoder_blocks(self.model)
            for index, block in enumerate(blocks):
                for name, linear in prunable_linears(block).items():
                    check_structure(self.nm, linear.in_features, f"block {index} {name}")
                    group = self.quant.group_size if self.quant.enabled else None
                    if group is not None and linear.in_features % group:
                        raise BesaError(f"model.quant.group_size={group} does not divide block {index} {name}'s "
                                        f"{linear.in_features} input features; pick a divisor or leave it unset")

    @property
    def tokenizer(self):
        self._load()
        return self._tokenizer

    def context_length(self) -> int | None:
        self._load()
        return getattr(self.model.config, "max_position_embeddings", None)

    @property
    def blocks(self):
        return decoder_blocks(self.model)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def model_for_evaluation(self):
        """The model on the Trainer's device: Lightning moves the module to the CPU before on_fit_end."""
        device = self.trainer.strategy.root_device
        return self.model.to(device).eval(), device

    @property
    def target_sparsity(self) -> float:
        """s*, or 1 - N/M under N:M structure (which decides the rate by itself)."""
        return 1.0 - self.nm[0] / self.nm[1] if self.nm else self.hparams.sparsity

    @property
    def pruning(self) -> bool:
        return self.hparams.method != "dense"

    def setup(self, stage: str) -> None:
        self._load()
        if stage != "fit" or self.cache is not None or not self.pruning:
            return
        self.fingerprint()  # of the base weights, before any block is pruned
        datamodule = self.trainer.datamodule
        tokens = datamodule.tokens
        self.model.to(self.device)
        self.cache = capture_block_inputs(
            self.model, tokens, dense_trajectory=self.hparams.target_mode == "dense_trajectory"
        )
        self.calibration_fingerprint = model_fingerprint(tokens)

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model)
        return self._fingerprint

    # ------------------------------------------------------------ block work
    @property
    def needs_hessian(self) -> bool:
        return self.hparams.method == "sparsegpt" or (
            self.hparams.method == "besa" and self.hparams.importance == "sparsegpt"
        )

    @property
    def dense_trajectory(self) -> bool:
        return self.hparams.target_mode == "dense_trajectory"

    def prepare_block(self) -> None:
        """Reference pass of the current block; then a BESABlock (BESA) or a one-shot prune."""
        hp = self.hparams
        index = self.block_index
        block = self.blocks[index].to(self.device)
        kwargs = self.cache.block_kwargs[index]
        linears = prunable_linears(block)
        # W0, for the reconstruction after the masks are final.
        self.dense_weights = ({name: linear.weight.detach().clone() for name, linear in linears.items()}
                              if hp.reconstruct != "none" else None)
        stats = {name: InputStatistics(linear, gram=self.needs_hessian) for name, linear in linears.items()}
        try:
            outputs = run_block(block, self.cache.inputs, kwargs, self.device)
        finally:
            for stat in stats.values():
                stat.remove()
        if self.dense_trajectory:  # the dense model's own activation; the next block's X_fp
            outputs = run_block(block, self.cache.dense_inputs, kwargs, self.device)
        self.cache.targets = outputs if hp.method == "besa" or self.dense_trajectory else None
        if hp.method == "besa":
            ranks = {name: row_ranks(importance_scores(hp.importance, linears[name].weight, stats[name])) for name in linears}
            self.current = BESABlock(
                block, kwargs_to(kwargs, self.device), ranks, self.rates, hp.sparsity, hp.granularity, hp.smoothing,
                hp.penalty_weight, hp.penalty_form, hp.optimizer, hp.lr, hp.d_coef, self.quant,
                hp.exact_sparsity, hp.smoothing_scale,
            )
        else:
            # SparseGPT quantizes inside its own sweep (GPTQ); the others round to nearest, unless the
            # reconstruction quantizes them later.
            grids = self._grids(None) if hp.method == "sparsegpt" and hp.reconstruct == "none" else None
            self.masks[index], self.quant_params[index] = {}, {}
            for name, linear in linears.items():
                keep, qparams = prune_linear(hp.method, linear, stats[name], hp.sparsity, hp.granularity, self.nm,
                                             (grids or {}).get(name),
                                             log=lambda msg, name=name: log.warning(f"block {index} {name}: {msg}"))
                self.masks[index][name] = keep.cpu()
                if qparams is not None:
                    self.quant_params[index][name] = qparams
                elif self.quant.enabled and hp.reconstruct == "none":
                    self.quant_params[index][name] = self._round_to_nearest(linear, keep)
            if not self.quant_params[index]:
                del self.quant_params[index]
            self.current = None
        self.prepared = True

    @torch.no_grad()
    def _round_to_nearest(self, linear, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Joint baseline: plain min-max RTN of the pruned weight, the mask applied after."""
        scale, zero = rtn_params(linear.weight, self.quant.bits, self.quant.group_size)
        burn_in(linear.weight, keep, self.quant, scale, zero)
        return scale.cpu(), zero.cpu()

    def _grids(self, clipping: dict[str, tuple[torch.Tensor, torch.Tensor]] | None) -> dict[str, QuantGrid] | None:
        """GPTQ grids for the reconstruction sweep: learned clipping strengths, or plain min-max."""
        if not self.quant.enabled:
            return None
        names = prunable_linears(self.blocks[self.block_index])
        return {name: QuantGrid(self.quant.bits, self.quant.group_size, *(clipping or {}).get(name, (None, None)))
                for name in names}

    def _reconstruct(self, clipping=None) -> None:
        """The closed-form step: kept weights re-solved under the final masks (and quantized)."""
        index = self.block_index
        qparams = reconstruct_block(
            self.blocks[index], self.dense_weights, self.masks[index], self.cache.inputs,
            self.cache.dense_inputs if self.dense_trajectory else None, self.cache.block_kwargs[index], self.device,
            self.hparams.reconstruct_reference, self._grids(clipping),
            log=lambda msg: log.warning(f"block {index} reconstruction: {msg}"),
        )
        if qparams:
            self.quant_params[index] = qparams
        self.dense_weights = None

    def finish_block(self) -> dict[str, Any]:
        """Burn in the masks, reconstruct, compute the next block's inputs, and move on."""
        index = self.block_index
        block = self.blocks[index]
        clipping = None
        if self.current is not None:
            rates = self.current.learned_rates()
            expected = self.current.expected_sparsity().item()
            clipping = self.current.clipping_strengths()
            masks, qparams = self.current.finalize()
            self.masks[index] = {name: mask.cpu() for name, mask in masks.items()}
            if qparams:
                self.quant_params[index] = {name: (s.cpu(), z.cpu()) for name, (s, z) in qparams.items()}
            self.learned[index] = {
                name: {"mean": float(r.mean()), "min": float(r.min()), "max": float(r.max())} for name, r in rates.items()
            }
            self.clipping[index] = clipping
            self.current = None
        else:
            expected = self.hparams.sparsity
        if self.hparams.reconstruct != "none":
            self._reconstruct(clipping)
        if self.dense_trajectory:
            self.cache.dense_inputs = self.cache.targets
        self.cache.targets = None
        run_block(block, self.cache.inputs, self.cache.block_kwargs[index], self.device, out=self.cache.inputs)
        block.to("cpu")
        kept = sum(int(mask.sum()) for mask in self.masks[index].values())
        total = sum(mask.numel() for mask in self.masks[index].values())
        entry = {"block": index, "expected_sparsity": expected, "realised_sparsity": 1 - kept / total}
        self.block_logs.append(entry)
        self.block_index += 1
        self.prepared = False
        return entry

    @torch.no_grad()
    def replay_block(self, masks, qparams, clipping) -> None:
        """Redo a finished block from its saved masks (resume): burn in or reconstruct, then forward."""
        index = self.block_index
        block = self.blocks[index].to(self.device)
        kwargs = self.cache.block_kwargs[index]
        linears = prunable_linears(block)
        if self.dense_trajectory:
            self.cache.targets = run_block(block, self.cache.dense_inputs, kwargs, self.device)
        self.masks[index] = masks
        if self.hparams.reconstruct != "none":
            self.dense_weights = {name: linear.weight.detach().clone() for name, linear in linears.items()}
            self._reconstruct(clipping)
        else:
            for name, linear in linears.items():
                burn_in(linear.weight, masks[name], self.quant, *(qparams or {}).get(name, (None, None)))
        if self.dense_trajectory:
            self.cache.dense_inputs = self.cache.targets
        self.cache.targets = None
        run_block(block, self.cache.inputs, kwargs, self.device, out=self.cache.inputs)
        block.to("cpu")
        self.block_index += 1

    def ensure_prepared(self) -> None:
        if self.pruning and not self.prepared and self.block_index < self.num_blocks:
            self.prepare_block()
            if self._resume is not None and self._resume.block_state and self.current is not None:
                self.current.load_trainable_state(self._resume.block_state)
            self._resume = None

    # ------------------------------------------------------------- lightning
    def configure_optimizers(self):
        self.ensure_prepared()
        if self.current is None:
            return None
        return self.current.configure_optimizers()

    def training_step(self, batch, batch_idx: int):
        if self.current is None:
            return None
        indices = batch.cpu()
        inputs = self.cache.inputs[indices].to(self.device)
        targets = self.cache.targets[indices].to(self.device)
        try:
            loss = self.current.training_step((inputs, targets), batch_idx)
        except FloatingPointError as error:
            raise BesaError(
                f"block {self.block_index}: {error}; the checkpoint of the last finished block is kept. "
                "Try --model.dtype float32, --trainer.precision 32 or a smaller --model.d_coef"
            ) from error
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        for optimizer in optimizers:
            optimizer.zero_grad()
        self.manual_backward(loss)
        for optimizer in optimizers:
            optimizer.step()
        metrics = self.current.last_metrics
        self.log("block", float(self.block_index), prog_bar=True, on_step=True, on_epoch=False)
        self.log("loss", metrics["loss"], prog_bar=True, on_step=True, on_epoch=True)
        self.log("expected_sparsity", metrics["expected_sparsity"], prog_bar=True, on_step=True, on_epoch=False)
        return loss.detach()

    def result_settings(self) -> dict[str, Any]:
        """Every setting that changes the pruned model (resume refuses if one differs)."""
        data = self.trainer.datamodule
        return block_fingerprint_settings(dict(self.hparams), data)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {}
        checkpoint.pop("hyper_parameters", None)  # the result-changing settings live in checkpoint["besa"]
        checkpoint["besa"] = dump_state(self)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._resume = load_state(self, checkpoint)
