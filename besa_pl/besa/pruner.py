"""BESAPruner: the LightningModule that trains the current block's sparsity logits.

It holds the settings, the model source (files, tokenizer, a skeleton whose blocks are read on
demand) and, while a block is being learned, that block as a `BESABlock`: the only module
Lightning moves between devices. The walk over the blocks is `loop/blockwise_loop.py`.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning as L
import torch

from besa_pl.besa.block import BESABlock
from besa_pl.besa.loss import channel_norms_squared
from besa_pl.errors import BesaError
from besa_pl.models.activations import ActivationCache
from besa_pl.models.source import ModelSource
from besa_pl.quant.quantizer import QuantConfig
from besa_pl.ranks import all_reduce_gradients, all_reduce_sum_, world_size
from besa_pl.settings import (
    CandidateGrid,
    DType,
    Granularity,
    Importance,
    Method,
    OptimizerName,
    PenaltyForm,
    PruneSettings,
    Reconstruct,
    Reference,
    Solve,
    TargetMode,
)

log = logging.getLogger("besa_pl")


class BESAPruner(L.LightningModule):
    """Prunes a causal LM block by block. Trainable parameters exist only for the current block.

    Args:
        pretrained: hub id, local HF folder, .gguf file, or a named model from PyPI wheels:
            `demo` (SmolLM2-135M-Instruct) or `demo-gemma3` (Gemma-3-270M).
        method: besa | wanda | sparsegpt | magnitude | dense (no pruning: the dense row).
        sparsity: target unstructured sparsity s*, 0 < s < 1.
        granularity: row (one allocation per output row, the paper) | layer (one per layer).
        structure: N:M semi-structured sparsity such as "2:4" (one-shot methods only).
        importance: ranking metric BESA learns over: wanda (default) | magnitude | sparsegpt.
        smoothing: softmax(sigmoid(logits)) as in the official code; false = softmax(logits).
        smoothing_scale: s in softmax(s * sigmoid(z)); 1 = the official code, whose rates stay within
            about +/-12% of the grid's centre; larger s lets them move further.
        candidate_grid: centered (grid centred at the target; = the official grid at 0.5) | uniform.
        num_candidates: number of candidate rates (101 in the official code).
        penalty_weight: lambda of the sparsity penalty (5).
        penalty_form: relative ((s-s*)/s*)^2, the code | absolute (s-s*)^2, the paper.
        target_mode: pruned_input (dense block on pruned inputs, the code) | dense_trajectory
            (the dense model's own activations, the paper's Algorithm 1).
        optimizer: prodigy (default) | adamw. lr: 1.0 for prodigy, ~1e-2 for adamw.
        d_coef: Prodigy's d_coef (5 for 7B/13B row-wise in the paper).
        epochs_per_block: passes over the calibration samples per block (1).
        dtype: weights' dtype: float32 | bfloat16 | float16.
        activation_dtype: dtype of the stored activations (None = dtype); bfloat16 halves their memory.
        quant: joint weight quantization (`--model.quant.bits 4 --model.quant.group_size 128`).
        exact_sparsity: shift a block's learned rates by one common amount so it ends exactly at the
            target; false = the official code's floor(C * alpha) (about 0.3% below the target).
        reconstruct: what happens to the kept weights once a block's masks are learned, sublayer by
            sublayer with SparseGPT's OBS sweep: auto (obs_select after BESA, none after the one-shot
            methods) | none (the paper: they keep their dense values) | obs (update under the masks) |
            obs_select (the masks' counts per row and 128-column block; the sweep picks which weights)
            | obs_row (per-row counts) | obs_layer (per-layer counts).
        reconstruct_reference: layer (each linear keeps its own dense output on its pruned-path input,
            SparseGPT's objective) | target (each linear matches its output in the forward that made
            the block's target: the asymmetric form).
        reconstruct_solve: exact (after the sweep, the kept weights are solved to the optimum for the
            final mask: masked least squares per row, Boza 2024) | sweep (as the OBS sweep leaves
            them: SparseGPT's update, which never moves a kept weight left of a pruned one).
        reconstruct_swaps: with the exact solve, up to this many rounds of swaps of a pruned and a
            kept weight inside each row, scored by the exact change of the least-squares error and
            kept only where the error falls (DSnoT-style; row counts unchanged); 0 = off.
        percdamp: SparseGPT's damping, lambda = percdamp x the mean diagonal of each input Gram, in
            every OBS sweep and solve; larger values keep the kept weights closer to their dense
            values. None (default): 0.01 for the SparseGPT baseline (as published); for the
            reconstruction 0.1 up to 50% sparsity and 0.01 above (chosen on held-out text).
    """

    def __init__(
        self,
        pretrained: str = "demo",
        method: Method = "besa",
        sparsity: float = 0.5,
        granularity: Granularity = "row",
        structure: str | None = None,
        importance: Importance = "wanda",
        smoothing: bool = True,
        smoothing_scale: float = 1.0,
        candidate_grid: CandidateGrid = "centered",
        num_candidates: int = 101,
        penalty_weight: float = 5.0,
        penalty_form: PenaltyForm = "relative",
        target_mode: TargetMode = "pruned_input",
        optimizer: OptimizerName = "prodigy",
        lr: float = 1.0,
        d_coef: float = 5.0,
        epochs_per_block: int = 1,
        dtype: DType = "float32",
        activation_dtype: DType | None = None,
        quant: QuantConfig = QuantConfig(),
        exact_sparsity: bool = True,
        reconstruct: Reconstruct = "auto",
        reconstruct_reference: Reference = "layer",
        reconstruct_solve: Solve = "exact",
        reconstruct_swaps: int = 10,
        percdamp: float | None = None,
    ) -> None:
        super().__init__()
        self.settings = PruneSettings(
            method=method, sparsity=sparsity, granularity=granularity, structure=structure, importance=importance,
            smoothing=smoothing, smoothing_scale=smoothing_scale, candidate_grid=candidate_grid,
            num_candidates=num_candidates, penalty_weight=penalty_weight, penalty_form=penalty_form,
            target_mode=target_mode, optimizer=optimizer, lr=lr, d_coef=d_coef, epochs_per_block=epochs_per_block,
            dtype=dtype, activation_dtype=activation_dtype, quant=quant, exact_sparsity=exact_sparsity,
            reconstruct=reconstruct, reconstruct_reference=reconstruct_reference, reconstruct_solve=reconstruct_solve,
            reconstruct_swaps=reconstruct_swaps, percdamp=percdamp,
        )
        self.pretrained = pretrained
        self.save_hyperparameters()
        self.strict_loading = False  # checkpoints never hold the base model's weights
        self.automatic_optimization = False  # the current block brings its own optimizers
        self.source: ModelSource | None = None
        self.cache: ActivationCache | None = None  # filled by BlockwiseLoop
        self.block_index = 0
        self.current: BESABlock | None = None
        self.block_optimizers: list[torch.optim.Optimizer] = []
        self.results: dict[str, Any] = {}

    # ----------------------------------------------------------------- model
    def open_source(self) -> ModelSource:
        if self.source is None:
            self.source = ModelSource(self.pretrained, self.settings)
        return self.source

    @property
    def tokenizer(self):
        return self.open_source().tokenizer

    def context_length(self) -> int | None:
        return getattr(self.open_source().config, "max_position_embeddings", None)

    @property
    def num_blocks(self) -> int:
        return self.open_source().num_blocks

    def setup(self, stage: str) -> None:
        self.open_source()

    def evaluation_model(self, offload: bool = False):
        """(model, device) for the fit-end evaluations: the pruned folder (or, for `dense`, the source)
        loaded whole when it fits; None when it does not (`offload`: then with accelerate's offloading)."""
        return self.open_source().evaluation_model(self.trainer, offload)

    # ------------------------------------------------------------- training
    def begin_training(self, block: BESABlock, state: dict | None = None) -> None:
        """Make `block` the module Lightning trains, with a fresh optimizer (or the saved one on resume)."""
        self.current = block.to(self.trainer.strategy.root_device)
        self.block_optimizers = block.configure_optimizers()
        if state is not None:
            block.load_trainable_state(state["trainable"])
            for optimizer, saved in zip(self.block_optimizers, state["optimizers"]):
                optimizer.load_state_dict(saved)

    def end_training(self) -> None:
        self.current = None
        self.block_optimizers = []

    def trainable_state(self) -> dict | None:
        if self.current is None:
            return None
        return {"trainable": self.current.trainable_state(),
                "optimizers": [optimizer.state_dict() for optimizer in self.block_optimizers]}

    def configure_optimizers(self):
        return None  # BESABlock's own optimizers, set up per block in begin_training

    def training_step(self, batch, batch_idx: int):
        if self.current is None:
            return None  # one-shot methods: the block was pruned when it began
        indices = batch.cpu()
        dtype = next(self.current.block.parameters()).dtype
        inputs = self.cache.inputs[indices].to(self.device, dtype, non_blocking=True)
        targets = self.cache.targets[indices].to(self.device, non_blocking=True)
        ranks = world_size()
        # Under DDP a micro-batch is every rank's samples: its channel norms are summed over ranks.
        norms = all_reduce_sum_(channel_norms_squared(targets)) if ranks > 1 else None
        try:
            loss = self.current.training_step((inputs, targets), batch_idx, norms, ranks)
            if ranks > 1:  # the same loss, and the same stop on a NaN, on every rank
                self.current.last_metrics["loss"] = float(all_reduce_sum_(loss.detach().clone()))
                if not math.isfinite(self.current.last_metrics["loss"]):
                    raise FloatingPointError(f"loss became {self.current.last_metrics['loss']} at step {batch_idx}")
        except FloatingPointError as error:
            raise BesaError(
                f"block {self.block_index}: {error}; the checkpoint of the last finished block is kept. "
                "Try --model.dtype float32, --trainer.precision 32 or a smaller --model.d_coef"
            ) from error
        for optimizer in self.block_optimizers:
            optimizer.zero_grad()
        self.manual_backward(loss)
        all_reduce_gradients([p for p in self.current.parameters() if p.requires_grad])
        for optimizer in self.block_optimizers:
            # Through the strategy, so the precision plugin unscales fp16 gradients first.
            self.trainer.strategy.optimizer_step(optimizer, closure=lambda: None, model=self)
        metrics = self.current.last_metrics
        self.log("loss", metrics["loss"], prog_bar=True, on_step=True, on_epoch=True)
        self.log("expected_sparsity", metrics["expected_sparsity"], prog_bar=True, on_step=True, on_epoch=False)
        return loss.detach()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {}  # no base weights; BlockwiseLoop adds what resuming needs
        checkpoint.pop("hyper_parameters", None)  # the result-changing settings live in checkpoint["besa"]
