"""Activation cache of the block being pruned, and the capture of what each block receives.

transformers 5.x computes rotary embeddings and per-layer-type attention masks once in the
model and passes them to every decoder layer, so the capture records every keyword argument
of every block (not only hidden states and one mask), then replays them when calling a block.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .models import call_block, decoder_blocks

# Keyword arguments that belong to incremental decoding; pruning never uses a KV cache.
_CACHE_KWARGS = ("past_key_values", "past_key_value", "cache", "layer_past")


class _StopCapture(Exception):
    pass


@dataclass
class ActivationCache:
    """Per-sample tensors for the current block, kept on `storage` (CPU RAM by default).

    inputs: pruned-path inputs X_p of the current block. targets: the reconstruction targets.
    dense_inputs: the dense trajectory X_fp, only in the dense-trajectory target mode.
    block_kwargs: the keyword arguments each block receives (same for every sample).
    """

    inputs: Tensor
    block_kwargs: list[dict]
    targets: Tensor | None = None
    dense_inputs: Tensor | None = None
    extras: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.inputs.shape[0]


def _to(value, device):
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    return value


def kwargs_to(kwargs: dict, device) -> dict:
    return {key: _to(value, device) for key, value in kwargs.items()}


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, tokens: Tensor, dense_trajectory: bool = False, storage: str = "cpu"
) -> ActivationCache:
    """Run the model up to its blocks on each calibration sample and record block inputs.

    Every block's forward is swapped for a recorder that returns its input unchanged, so the
    model's own code builds the position embeddings and masks for every layer type; only
    block 0's hidden states are stored for every sample.
    """
    blocks = decoder_blocks(model)
    device = next(model.parameters()).device
    recorded_kwargs: list[dict | None] = [None] * len(blocks)
    hidden_states: list[Tensor] = []
    originals = []

    def recorder(index: int):
        def forward(hidden, *args, **kwargs):
            if index == 0:
                hidden_states.append(hidden.detach().to(storage))
            if recorded_kwargs[index] is None:
                kept = {k: v for k, v in kwargs.items() if k not in _CACHE_KWARGS}
                kept["use_cache"] = False
                recorded_kwargs[index] = kwargs_to(kept, storage)
            if index == len(blocks) - 1:
                raise _StopCapture
            return hidden

        return forward

    for index, block in enumerate(blocks):
        originals.append(block.forward)
        block.forward = recorder(index)
    try:
        for sample in tokens:
            try:
                model(sample.unsqueeze(0).to(device), use_cache=False)
            except _StopCapture:
                pass
    finally:
        for block, original in zip(blocks, originals):
            block.forward = original
    inputs = torch.cat(hidden_states, dim=0)
    return ActivationCache(
        inputs=inputs,
        block_kwargs=recorded_kwargs,
        dense_inputs=inputs.clone() if dense_trajectory else None,
    )


@torch.no_grad()
def run_block(block: nn.Module, inputs: Tensor, kwargs: dict, device, out: Tensor | None = None) -> Tensor:
    """Apply a block to every sample (micro-batch 1), writing into `out` (may alias `inputs`)."""
    out = torch.empty_like(inputs) if out is None else out
    kwargs = kwargs_to(kwargs, device)
    for i in range(inputs.shape[0]):
        hidden = inputs[i : i + 1].to(device)
        out[i : i + 1] = call_block(block, hidden, kwargs).to(out.dtype).to(out.device)
    return out
