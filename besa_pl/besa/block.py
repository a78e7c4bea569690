"""BESABlock: one decoder block whose only trainable parameters are its sparsity logits."""

from __future__ import annotations

import math

import lightning as L
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from besa_pl.besa.allocation import (
    SparsityAllocation,
    candidate_rates,
    exact_target_counts,
    prune_counts,
)
from besa_pl.besa.channel_scales import ChannelScales
from besa_pl.besa.loss import reconstruction_loss, sparsity_penalty
from besa_pl.closedform.gram import exact_sum_dtype
from besa_pl.models.loading import call_block, prunable_linears
from besa_pl.oneshot.importance import row_ranks
from besa_pl.quant.quantizer import LearnableClipQuantizer, burn_in
from besa_pl.settings import PruneSettings


class BESABlock(L.LightningModule):
    """A frozen decoder block with a learnable masking parametrization on every linear weight:
    the sparsity logits of BESA's allocation, or under N:M structure the channel scales
    (`channel_scales.py`), both built from each linear's one-shot importance `scores`.

    `training_step` takes a batch `(inputs, targets)`, so a block can be fitted on its own by a
    Trainer; inside `besa-pl fit`, BESAPruner feeds it from the activation cache.
    """

    def __init__(
        self, block: nn.Module, block_kwargs: dict, scores: dict[str, Tensor], settings: PruneSettings
    ) -> None:
        super().__init__()
        self.block = block
        self.block_kwargs = block_kwargs
        self.settings = settings
        self.quant = settings.quant if settings.quant.enabled else None
        self.linears = prunable_linears(block)
        total = sum(linear.weight.numel() for linear in self.linears.values())
        self.shares = {name: linear.weight.numel() / total for name, linear in self.linears.items()}
        rates = candidate_rates(settings.sparsity, settings.num_candidates, settings.candidate_grid)
        for name, linear in self.linears.items():
            device = linear.weight.device
            if self.quant is not None:  # W_eff = Q(W) * M: quantize first, then mask
                quantizer = LearnableClipQuantizer(
                    linear.weight.shape,
                    self.quant.bits,
                    self.quant.group_size,
                    self.quant.clip_init,
                    self.quant.learn_clipping,
                )
                parametrize.register_parametrization(linear, "weight", quantizer.to(device))
            if settings.nm is not None:
                allocation = ChannelScales(scores[name].to(device), *settings.nm, settings.nm_temperature)
            else:
                allocation = SparsityAllocation(
                    row_ranks(scores[name].to(device)),
                    rates,
                    settings.granularity,
                    settings.smoothing,
                    settings.smoothing_scale,
                )
            parametrize.register_parametrization(linear, "weight", allocation.to(device))
        self.last_metrics: dict[str, float] = {}

    def allocation(self, name: str) -> SparsityAllocation | ChannelScales:
        return self.linears[name].parametrizations.weight[-1]

    def quantizer(self, name: str) -> LearnableClipQuantizer | None:
        return self.linears[name].parametrizations.weight[0] if self.quant is not None else None

    def forward(self, hidden: Tensor) -> Tensor:
        return call_block(self.block, hidden, self.block_kwargs)

    def expected_sparsity(self) -> Tensor:
        """Parameter-weighted mean of the layers' expected rates: the s of the sparsity penalty."""
        return sum(share * self.allocation(name).expected_sparsity() for name, share in self.shares.items())

    def penalty(self) -> Tensor:
        """The sparsity penalty on the block's expected sparsity (differentiable)."""
        s = self.settings
        return sparsity_penalty(self.expected_sparsity(), s.sparsity, s.penalty_weight, s.penalty_form)

    def objective(
        self, output: Tensor, target: Tensor, norms_squared: Tensor | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        """Reconstruction plus sparsity penalty, for fitting a block on its own (BESAPruner sums
        per-sample gradients instead: `summed_gradients`)."""
        rec = reconstruction_loss(output, target, norms_squared)
        loss = rec + self.penalty()
        metrics = {
            "loss": loss.item(),
            "reconstruction": rec.item(),
            "expected_sparsity": self.expected_sparsity().item(),
        }
        return loss, metrics

    def training_step(self, batch, batch_idx: int = 0, norms_squared: Tensor | None = None) -> Tensor:
        inputs, targets = batch
        loss, self.last_metrics = self.objective(self(inputs), targets, norms_squared)
        if not math.isfinite(self.last_metrics["loss"]):
            raise FloatingPointError(f"loss became {self.last_metrics['loss']} at step {batch_idx}")
        return loss

    def summed_gradients(
        self, inputs: Tensor, targets: Tensor, norms_squared: Tensor, backward, with_penalty: bool
    ) -> tuple[list[Tensor], float, float]:
        """The gradients of this rank's share of the objective, one backward per sample, summed in
        float64 (`backward` is the caller's, e.g. Lightning's manual_backward): each sample's
        reconstruction term with the micro-batch's `norms_squared`, and, `with_penalty`, the sparsity
        penalty once. Summing the very same per-sample gradients exactly, one process holding the
        micro-batch and R ranks holding one share each get the same gradients, bit for bit.
        Returns (a sum per trainable tensor, the reconstruction terms' sum, the expected sparsity)."""
        params = [p for p in self.parameters() if p.requires_grad]
        sums = [torch.zeros_like(p, dtype=exact_sum_dtype(p.device)) for p in params]

        def add(loss: Tensor) -> None:
            backward(loss)
            for total, p in zip(sums, params):
                if p.grad is not None:
                    total += p.grad
                    p.grad = None

        reconstruction = 0.0
        for i in range(inputs.shape[0]):
            rec = reconstruction_loss(self(inputs[i : i + 1]), targets[i : i + 1], norms_squared)
            reconstruction += rec.item()
            if math.isfinite(reconstruction):
                add(rec)
        if with_penalty:
            penalty = self.penalty()
            if penalty.requires_grad:  # N:M: the rate is fixed, no penalty to follow
                add(penalty)
        return sums, reconstruction, self.expected_sparsity().item()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """The logits' (or channel scales') optimizer, and AdamW for the clipping logits when learned."""
        params = [p for name in self.linears for p in self.allocation(name).parameters()]
        s = self.settings
        if s.nm is not None:  # the channel scales (see the nm_lr setting)
            optimizers = [torch.optim.AdamW(params, lr=s.nm_lr, weight_decay=0.0)]
        elif s.optimizer == "prodigy":
            from prodigyopt import Prodigy

            # The official release scripts' settings; only d_coef varies by model (paper section 4.1).
            optimizers = [
                Prodigy(
                    params,
                    lr=s.lr,
                    d_coef=s.d_coef,
                    weight_decay=0.0,
                    decouple=True,
                    use_bias_correction=False,
                    safeguard_warmup=False,
                    d0=1e-6,
                )
            ]
        else:
            optimizers = [torch.optim.AdamW(params, lr=s.lr, weight_decay=0.0)]
        if self.quant is not None and self.quant.learn_clipping:
            clips = [
                p for name in self.linears for p in (self.quantizer(name).clip_upper, self.quantizer(name).clip_lower)
            ]
            optimizers.append(torch.optim.AdamW(clips, lr=self.quant.clip_lr, weight_decay=0.0))
        return optimizers

    def trainable_state(self) -> dict[str, Tensor]:
        """Every trainable tensor by name: the logits and, when learned, the clipping logits."""
        return {name: p.detach().clone() for name, p in self.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def load_trainable_state(self, state: dict[str, Tensor]) -> None:
        params = dict(self.named_parameters())
        for name, value in state.items():
            params[name].copy_(value)

    @torch.no_grad()
    def final_counts(self) -> dict[str, Tensor]:
        """Per-row prune counts of the final masks: floor(C * alpha), or the exact-target ones."""
        alphas = {name: self.allocation(name).row_alpha() for name in self.linears}
        columns = [self.allocation(name).columns for name in self.linears]
        if not self.settings.exact_sparsity:
            return {name: prune_counts(a, c) for (name, a), c in zip(alphas.items(), columns)}
        return dict(zip(alphas, exact_target_counts(list(alphas.values()), columns, self.settings.sparsity)))

    @torch.no_grad()
    def clipping_strengths(self) -> dict[str, tuple[Tensor, Tensor]] | None:
        """(gamma, delta) per linear with learned clipping, for the reconstruction's GPTQ grid."""
        if self.quant is None or not self.quant.learn_clipping:
            return None
        return {name: tuple(t.detach().cpu() for t in self.quantizer(name).gamma_delta()) for name in self.linears}

    @torch.no_grad()
    def column_weights(self) -> dict[str, Tensor] | None:
        """Under N:M, each linear's learned saliency factor per input column, for the reconstruction."""
        if self.settings.nm is None:
            return None
        return {name: self.allocation(name).column_weight().cpu() for name in self.linears}

    @torch.no_grad()
    def learned_rates(self) -> dict[str, Tensor]:
        """Per-row expected rate of every layer (fp32, outside autocast)."""
        return {name: self.allocation(name).row_alpha().cpu() for name in self.linears}

    @torch.no_grad()
    def finalize(self) -> tuple[dict[str, Tensor], dict[str, tuple[Tensor, Tensor]]]:
        """Hard masks in fp32, burned into the (quantized) weights; returns masks and quant params."""
        counts = self.final_counts() if self.settings.nm is None else {}
        masks = {name: self.allocation(name).hard_mask(counts.get(name)) for name in self.linears}
        qparams = {}
        for name, linear in self.linears.items():
            if self.quant is not None:
                qparams[name] = self.quantizer(name).params(linear.parametrizations.weight.original)
            parametrize.remove_parametrizations(linear, "weight", leave_parametrized=False)
            burn_in(linear.weight, masks[name], self.settings.quant, *qparams.get(name, (None, None)))
        return masks, qparams
