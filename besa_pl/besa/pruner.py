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
from besa_pl.besa.loss import channel_square_sums
from besa_pl.errors import BesaError
from besa_pl.models.activations import ActivationCache
from besa_pl.models.source import ModelSource
from besa_pl.ranks import all_reduce_sum_, all_reduce_sum_flat_, is_main
from besa_pl.settings import PruneSettings

log = logging.getLogger("besa_pl")


class BESAPruner(L.LightningModule):
    """Prunes a causal LM block by block. Trainable parameters exist only for the current block.

    Args:
        pretrained: hub id, local HF folder, .gguf file, or a named model from PyPI wheels:
            `demo` (SmolLM2-135M-Instruct), `demo-gemma3` (Gemma-3-270M) or `qwen2.5-coder-1.5b`
            (Qwen2.5-Coder-1.5B-Instruct).
        **settings: the pruning settings, each a `PruneSettings` field (`--model.sparsity 0.6`);
            validated once, here, into the frozen `self.settings`.
    """

    def __init__(self, pretrained: str = "demo", **settings: Any) -> None:
        super().__init__()
        self.settings = PruneSettings(**settings)
        self.pretrained = pretrained
        self.save_hyperparameters()
        self.strict_loading = False  # checkpoints never hold the base model's weights
        self.automatic_optimization = False  # the current block brings its own optimizers
        self.source: ModelSource | None = None
        self.cache: ActivationCache | None = None  # filled by BlockwiseLoop
        self.records: list[dict] = []  # one per finished block (shard, sparsity, learned rates), kept by BlockwiseLoop
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

    @property
    def block_index(self) -> int:
        """The block being pruned: the number of finished ones."""
        return len(self.records)

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
        return {
            "trainable": self.current.trainable_state(),
            "optimizers": [optimizer.state_dict() for optimizer in self.block_optimizers],
        }

    def configure_optimizers(self):
        return None  # BESABlock's own optimizers, set up per block in begin_training

    def training_step(self, batch, batch_idx: int):
        if self.current is None:
            return None  # one-shot methods: the block was pruned when it began
        indices = batch.cpu()
        dtype = next(self.current.block.parameters()).dtype
        inputs = self.cache.inputs[indices].to(self.device, dtype, non_blocking=True)
        targets = self.cache.targets[indices].to(self.device, non_blocking=True)
        # A micro-batch is every rank's samples: its channel norms and gradients are summed over
        # ranks, exactly (float64), so R ranks train as one process with R times the micro-batch.
        norms = all_reduce_sum_(channel_square_sums(targets)).float()
        for optimizer in self.block_optimizers:
            optimizer.zero_grad()
        sums, reconstruction, expected = self.current.summed_gradients(
            inputs, targets, norms, self.manual_backward, with_penalty=is_main()
        )
        totals = torch.tensor([reconstruction], dtype=torch.float64, device=self.device)
        reconstruction = float(all_reduce_sum_(totals))
        loss = reconstruction + self.current.penalty().item()
        if not math.isfinite(loss):  # the same stop on every rank
            raise BesaError(
                f"block {self.block_index}: loss became {loss} at step {batch_idx}; the checkpoint of the last "
                "finished block is kept. Try --model.dtype float32, --trainer.precision 32 or a smaller --model.d_coef"
            )
        params = [p for p in self.current.parameters() if p.requires_grad]
        all_reduce_sum_flat_(sums)
        for p, total in zip(params, sums):
            p.grad = total.to(p.dtype)
        for optimizer in self.block_optimizers:
            # Through the strategy, so the precision plugin unscales fp16 gradients first.
            self.trainer.strategy.optimizer_step(optimizer, closure=lambda: None, model=self)
        self.current.last_metrics = {"loss": loss, "reconstruction": reconstruction, "expected_sparsity": expected}
        self.log("loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        self.log("expected_sparsity", expected, prog_bar=True, on_step=True, on_epoch=False)
        return torch.tensor(loss)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {}  # no base weights; BlockwiseLoop adds what resuming needs
        checkpoint.pop("hyper_parameters", None)  # the result-changing settings live in checkpoint["besa"]
