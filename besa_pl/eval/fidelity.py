"""FidelityEval: how close the pruned model stays to the dense one, with no data set at all.

The dense model writes a few texts itself (a generation seed other than the calibration's, so
never the calibration tokens); both models then read them, block by block side by side (as the
streamed perplexity does, so it works for models larger than the device), and their next-token
distributions are compared at every position:

- mean KL(dense || pruned), in nats: the measure llama.cpp's `perplexity --kl-divergence` made
  the convention for judging compressed models (0 = the same distributions);
- top-1 agreement: the share of positions where both pick the same most likely token;
- the perplexity of each model on that text (the dense model's own text is easy for it, so only
  the pair is meaningful, never one number against a data set's perplexity).
"""

from __future__ import annotations

import math

import torch
from lightning.pytorch import Callback
from torch import Tensor

from besa_pl.console import console, stage
from besa_pl.data.self_calibration import SelfRecipe, self_calibration_tokens
from besa_pl.errors import BesaError, at_least
from besa_pl.models.activations import capture_block_inputs, head_logits, run_block
from besa_pl.models.weights import WeightStore


class FidelityTotals:
    """Sums over positions of KL, top-1 agreement and both models' next-token losses."""

    def __init__(self) -> None:
        self.kl = self.agree = self.loss_dense = self.loss_pruned = 0.0
        self.positions = 0

    @torch.no_grad()
    def add(self, dense_logits: Tensor, pruned_logits: Tensor, ids: Tensor) -> None:
        """One batch of windows: logits (batch x T x vocab) of both models on the token ids (batch x T)."""
        for row in range(ids.shape[0]):  # one window at a time: fp32 copies of a large vocabulary add up
            dense = torch.log_softmax(dense_logits[row, :-1].float(), dim=-1)
            pruned = torch.log_softmax(pruned_logits[row, :-1].float(), dim=-1)
            targets = ids[row, 1:].to(dense.device)
            self.kl += float((dense.exp() * (dense - pruned)).sum(dim=-1).clamp_min(0).sum())
            self.agree += float((dense.argmax(dim=-1) == pruned.argmax(dim=-1)).sum())
            self.loss_dense -= float(dense.gather(1, targets.view(-1, 1)).sum())
            self.loss_pruned -= float(pruned.gather(1, targets.view(-1, 1)).sum())
            self.positions += targets.numel()

    def summary(self) -> dict[str, float]:
        n = max(self.positions, 1)
        return {
            "kl": self.kl / n,
            "top1_agreement": self.agree / n,
            "perplexity_dense": math.exp(self.loss_dense / n),
            "perplexity_pruned": math.exp(self.loss_pruned / n),
            "positions": self.positions,
        }


@torch.no_grad()
def streamed_fidelity(source, pruned_folder, ids: Tensor, device, batch_size: int = 1) -> dict[str, float]:
    """Dense and pruned hidden states side by side, one block in memory at a time (the dense block
    from the source files, the pruned one from `pruned_folder`); the model's head scores both."""
    pruned_store = WeightStore(pruned_folder)
    cache = capture_block_inputs(source.model, ids, device="cpu")
    dense_hidden, pruned_hidden = cache.inputs, cache.inputs.clone()
    for index in range(source.num_blocks):
        kwargs = cache.block_kwargs[index]
        run_block(
            source.load_block(index, device), dense_hidden, kwargs, device, out=dense_hidden, batch_size=batch_size
        )
        source.release_block(index)
        run_block(
            source.load_block(index, device, pruned_store),
            pruned_hidden,
            kwargs,
            device,
            out=pruned_hidden,
            batch_size=batch_size,
        )
        source.release_block(index)
    totals = FidelityTotals()
    source.move_outer(device)
    try:
        for start in range(0, ids.shape[0], batch_size):
            batch = ids[start : start + batch_size].to(device)
            dense = head_logits(source.model, batch, dense_hidden[start : start + batch_size].to(device))
            pruned = head_logits(source.model, batch, pruned_hidden[start : start + batch_size].to(device))
            totals.add(dense, pruned, batch)
    finally:
        source.move_outer("cpu")
    return totals.summary()


class FidelityEval(Callback):
    """Fidelity of the pruned model to the dense one on text the dense model writes (no data needed).

    Args:
        nsamples: texts the dense model writes (cached per model and seed, like self-calibration).
        seqlen: tokens per text.
        seed: generation seed; must differ from `data.seed` when calibrating with `--data.dataset
            self`, so these texts are never the calibration tokens.
        batch_size: texts per forward pass (no effect on the result).
    """

    def __init__(self, nsamples: int = 8, seqlen: int = 256, seed: int = 1234, batch_size: int = 4) -> None:
        at_least("FidelityEval.nsamples", nsamples, 1)
        at_least("FidelityEval.seqlen", seqlen, 2)
        at_least("FidelityEval.batch_size", batch_size, 1)
        self.nsamples, self.seqlen, self.seed, self.batch_size = nsamples, seqlen, seed, batch_size

    def setup(self, trainer, pruner, stage: str) -> None:
        data = trainer.datamodule
        if getattr(data, "dataset", None) == "self" and getattr(data, "seed", None) == self.seed:
            raise BesaError(
                f"FidelityEval.seed={self.seed} is the calibration's data.seed: the texts would be the "
                "calibration tokens; give FidelityEval another seed"
            )

    def on_fit_end(self, trainer, pruner) -> None:
        if not trainer.is_global_zero or not pruner.settings.pruning:
            return  # under DDP once, on rank 0; a dense run has nothing to compare
        source = pruner.open_source()
        device = trainer.strategy.root_device
        ids, described = self_calibration_tokens(
            source, self.nsamples, self.seqlen, self.seed, SelfRecipe(), device, label="fidelity text"
        )
        calibration = getattr(trainer.datamodule, "tokens", None)
        if calibration is not None and calibration.shape[1] == ids.shape[1]:
            if (ids.unsqueeze(1) == calibration.unsqueeze(0)).all(dim=-1).any():
                raise BesaError("FidelityEval: a text equals a calibration sample; give FidelityEval another seed")
        stage(f"evaluation: fidelity to the dense model on {self.nsamples} texts of {self.seqlen} tokens")
        found = streamed_fidelity(source, source.evaluation_folder(trainer), ids, device, self.batch_size)
        found.update({"texts": self.nsamples, "seqlen": self.seqlen, "seed": self.seed, "source": described})
        pruner.results["fidelity"] = found
        console.print(
            f"fidelity to the dense model ({self.nsamples} x {self.seqlen} tokens it wrote, seed {self.seed}): "
            f"KL {found['kl']:.4f} nats, top-1 agreement {100 * found['top1_agreement']:.2f}%, "
            f"perplexity {found['perplexity_pruned']:.3f} (dense {found['perplexity_dense']:.3f})"
        )
        if trainer.logger is not None:
            trainer.logger.log_metrics({"fidelity/kl": found["kl"], "fidelity/top1": found["top1_agreement"]})
