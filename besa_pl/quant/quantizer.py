"""Weight quantization with learnable clipping (OmniQuant style), learned jointly with BESA's masks
(the joint compression of Xu et al., ICLR 2024, arXiv 2402.16880).

Per group (a whole output row, or g consecutive input columns of a row):
    gamma = sigmoid(a), delta = sigmoid(b)
    h = (gamma * max(W_g) - delta * min(W_g)) / (2^N - 1)
    z = -round(delta * min(W_g) / h)
    Q(W_g) = h * (clamp(round(W_g / h) + z, 0, 2^N - 1) - z)
with straight-through rounding, so gradients reach a and b. The mask is applied after
quantization, so pruned weights stay exactly zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

SUPPORTED_BITS = (2, 3, 4, 8)


@dataclass
class QuantConfig:
    """Joint weight quantization (off unless `bits` is set).

    Args:
        bits: 2, 3, 4 or 8; None = no quantization.
        group_size: input columns per quantization group; None = one group per output row.
        learn_clipping: learn the clipping strengths (BESA joint); false = plain min-max RTN.
        clip_lr: AdamW learning rate of the clipping logits (OmniQuant's 1e-2).
        clip_init: initial clipping logit (OmniQuant's 4, sigmoid = 0.982).
    """

    bits: int | None = None
    group_size: int | None = None
    learn_clipping: bool = True
    clip_lr: float = 1e-2
    clip_init: float = 4.0

    @property
    def enabled(self) -> bool:
        return self.bits is not None


def round_ste(x: Tensor) -> Tensor:
    """round() in the forward pass, identity in the backward pass."""
    return x + (torch.round(x) - x).detach()


def _grouped(weight: Tensor, group_size: int | None) -> Tensor:
    rows, cols = weight.shape
    size = cols if group_size is None else group_size
    return weight.reshape(rows, cols // size, size)


def quant_params(
    weight: Tensor, bits: int, group_size: int | None, gamma: Tensor, delta: Tensor
) -> tuple[Tensor, Tensor]:
    """(scale h, zero-point z) per group, from clipped min/max (gamma, delta broadcast per group)."""
    groups = _grouped(weight.float(), group_size)
    qmax = 2**bits - 1
    wmax = groups.amax(dim=-1) * gamma
    wmin = groups.amin(dim=-1) * delta
    scale = ((wmax - wmin) / qmax).clamp_min(1e-8)
    zero = -round_ste(wmin / scale)
    return scale, zero


def quantize_codes(weight: Tensor, bits: int, group_size: int | None, scale: Tensor, zero: Tensor) -> Tensor:
    """Integer codes in [0, 2^bits - 1] (straight-through rounding)."""
    groups = _grouped(weight.float(), group_size)
    return torch.clamp(round_ste(groups / scale.unsqueeze(-1)) + zero.unsqueeze(-1), 0, 2**bits - 1)


def dequantize(codes: Tensor, scale: Tensor, zero: Tensor, shape) -> Tensor:
    return ((codes - zero.unsqueeze(-1)) * scale.unsqueeze(-1)).reshape(shape)


def fake_quantize(weight: Tensor, bits: int, group_size: int | None, gamma: Tensor, delta: Tensor) -> Tensor:
    scale, zero = quant_params(weight, bits, group_size, gamma, delta)
    return dequantize(quantize_codes(weight, bits, group_size, scale, zero), scale, zero, weight.shape)


def rtn_params(weight: Tensor, bits: int, group_size: int | None) -> tuple[Tensor, Tensor]:
    """(scale, zero-point) of plain min-max round-to-nearest (no clipping)."""
    one = torch.ones((), device=weight.device)
    return quant_params(weight, bits, group_size, one, one)


def rtn(weight: Tensor, bits: int, group_size: int | None) -> Tensor:
    """Plain min-max round-to-nearest (no clipping)."""
    scale, zero = rtn_params(weight, bits, group_size)
    return dequantize(quantize_codes(weight, bits, group_size, scale, zero), scale, zero, weight.shape).to(weight.dtype)


class LearnableClipQuantizer(nn.Module):
    """Parametrization W -> Q(W) with two clipping logits per group."""

    def __init__(
        self, shape: torch.Size, bits: int, group_size: int | None, init: float = 4.0, learn: bool = True
    ) -> None:
        super().__init__()
        rows, cols = shape
        groups = 1 if group_size is None else cols // group_size
        self.bits = bits
        self.group_size = group_size
        upper = torch.full((rows, groups), float(init))
        lower = torch.full((rows, groups), float(init))
        if learn:
            self.clip_upper = nn.Parameter(upper)
            self.clip_lower = nn.Parameter(lower)
        else:
            self.register_buffer("clip_upper", torch.full((rows, groups), float("inf")))
            self.register_buffer("clip_lower", torch.full((rows, groups), float("inf")))

    def gamma_delta(self) -> tuple[Tensor, Tensor]:
        return torch.sigmoid(self.clip_upper.float()), torch.sigmoid(self.clip_lower.float())

    def params(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        """Final (scale, zero-point) per group, for burning in and for the packed export."""
        with torch.no_grad():
            gamma, delta = self.gamma_delta()
            scale, zero = quant_params(weight, self.bits, self.group_size, gamma, delta)
        return scale, zero

    def forward(self, weight: Tensor) -> Tensor:
        with torch.autocast(weight.device.type, enabled=False):
            gamma, delta = self.gamma_delta()
            return fake_quantize(weight, self.bits, self.group_size, gamma, delta).to(weight.dtype)


def apply_params(weight: Tensor, bits: int, group_size: int | None, scale: Tensor, zero: Tensor) -> Tensor:
    """Quantize-dequantize with fixed (scale, zero-point)."""
    codes = quantize_codes(weight, bits, group_size, scale, zero)
    return dequantize(codes, scale, zero, weight.shape).to(weight.dtype)


@torch.no_grad()
def burn_in(
    weight: Tensor, keep: Tensor, config: QuantConfig, scale: Tensor | None = None, zero: Tensor | None = None
) -> None:
    """In place: W <- Q(W) * keep (Q skipped without quantization). The one rule for finishing a
    block, for the joint baselines and for replaying finished blocks on resume."""
    if config.enabled:
        scale, zero = scale.to(weight.device), zero.to(weight.device)
        weight.copy_(apply_params(weight, config.bits, config.group_size, scale, zero))
    weight.mul_(keep.to(weight.device, weight.dtype))
