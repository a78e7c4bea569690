"""The activations of the block being pruned, and the capture of what each block receives.

transformers 5.x computes rotary embeddings and per-layer-type attention masks once in the
model and passes them to every decoder layer, so the capture records every keyword argument
of every block (not only hidden states and one mask), then replays them when calling a block.

Activations live in CPU memory (pinned when a GPU computes), in `dtype`, and travel to the
device one micro-batch at a time; only the current block's weights are on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from besa_pl.models.loading import call_block, decoder_blocks

# Keyword arguments that belong to incremental decoding; pruning never uses a KV cache.
_CACHE_KWARGS = ("past_key_values", "past_key_value", "cache", "layer_past")


class _StopCapture(Exception):
    pass


@dataclass
class ActivationCache:
    """Per-sample tensors for the current block.

    inputs: pruned-path inputs X_p of the current block. targets: the block's reconstruction
    targets (or, in the dense-trajectory mode, the next block's X_fp). dense_inputs: the dense
    trajectory X_fp, only in the dense-trajectory target mode. block_kwargs: the keyword arguments
    each block receives (the same for every sample).
    """

    inputs: Tensor
    block_kwargs: list[dict]
    targets: Tensor | None = None
    dense_inputs: Tensor | None = None

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


class _Recorder(nn.Module):
    """Stands in for a decoder block during the capture: records what it receives, returns its input."""

    def __init__(self, index: int, last: bool, store: list[Tensor], kwargs: list[dict | None]) -> None:
        super().__init__()
        self.index, self.last, self.store, self.kwargs = index, last, store, kwargs

    def forward(self, hidden, *args, **kwargs):
        if self.index == 0:
            self.store.append(hidden.detach())
        if self.kwargs[self.index] is None:
            kept = {k: v for k, v in kwargs.items() if k not in _CACHE_KWARGS}
            kept["use_cache"] = False
            self.kwargs[self.index] = kwargs_to(kept, "cpu")
        if self.last:
            raise _StopCapture
        return hidden


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    tokens: Tensor,
    dense_trajectory: bool = False,
    dtype: torch.dtype | None = None,
    device=None,
    pin: bool = False,
) -> ActivationCache:
    """Run the model up to its blocks on each calibration sample and record block inputs.

    The blocks are swapped for recorders in their ModuleList (and put back after), so the model's
    own code builds the position embeddings and masks for every layer type while the blocks
    themselves, possibly still on the meta device, never run.
    """
    blocks = decoder_blocks(model)
    device = device if device is not None else next(p for p in model.parameters() if p.device.type != "meta").device
    recorded_kwargs: list[dict | None] = [None] * len(blocks)
    hidden_states: list[Tensor] = []
    originals = list(blocks)
    for index in range(len(blocks)):
        blocks[index] = _Recorder(index, index == len(blocks) - 1, hidden_states, recorded_kwargs)
    try:
        for sample in tokens:
            try:
                model(sample.unsqueeze(0).to(device), use_cache=False)
            except _StopCapture:
                pass
    finally:
        for index, block in enumerate(originals):
            blocks[index] = block
    inputs = torch.cat([h.to("cpu", dtype) if dtype is not None else h.cpu() for h in hidden_states], dim=0)
    if pin:
        inputs = inputs.pin_memory()
    return ActivationCache(
        inputs=inputs,
        block_kwargs=recorded_kwargs,
        dense_inputs=inputs.clone() if dense_trajectory else None,
    )


@torch.no_grad()
def run_block(
    block: nn.Module, inputs: Tensor, kwargs: dict, device, out: Tensor | None = None, batch_size: int = 1
) -> Tensor:
    """Apply a block to every sample, `batch_size` at a time, writing into `out` (may alias `inputs`)."""
    out = torch.empty_like(inputs) if out is None else out
    kwargs = kwargs_to(kwargs, device)
    dtype = next(block.parameters()).dtype  # activations may be stored in a narrower dtype
    for start in range(0, inputs.shape[0], batch_size):
        hidden = inputs[start : start + batch_size].to(device, dtype, non_blocking=True)
        out[start : start + batch_size] = call_block(block, hidden, kwargs).to(out.device, out.dtype)
    return out


class _Replay(nn.Module):
    """Stands in for the blocks when the head scores hidden states computed elsewhere."""

    def __init__(self, hidden: Tensor | None) -> None:
        super().__init__()
        self.hidden = hidden

    def forward(self, hidden, *args, **kwargs):
        return self.hidden if self.hidden is not None else hidden


@torch.no_grad()
def head_logits(model: nn.Module, ids: Tensor, final_hidden: Tensor) -> Tensor:
    """The model's logits for `ids` given the last block's output: the first block is swapped for one
    that returns `final_hidden` and the others for the identity, so the model's own final norm, LM
    head and soft-capping run as usual."""
    blocks = decoder_blocks(model)
    originals = list(blocks)
    for index in range(len(blocks)):
        blocks[index] = _Replay(final_hidden if index == 0 else None)
    try:
        return model(ids, use_cache=False).logits
    finally:
        for index, block in enumerate(originals):
            blocks[index] = block
