"""A packed form of a pruned + quantized model that really saves bytes, and its loader.

Per prunable linear: the keep-mask (1 bit per weight), the integer codes of the kept weights
only (`bits` bits each), and per-group scale (fp32) and zero-point (int16). Everything else
(embeddings, norms, LM head) is stored in fp16. Unpacking reproduces the exported
dequantized weights exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from besa_pl.models.loading import prunable_linears
from besa_pl.models.weights import ShardWriter, WeightStore
from besa_pl.quant.quantizer import dequantize, quantize_codes

FORMAT = "besa-pl-packed-v2"
PACKED_PARTS = ("mask", "codes", "scale", "zero")


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned integers < 2^bits -> a little-endian bit stream in uint8."""
    planes = (values.astype(np.uint16)[:, None] >> np.arange(bits, dtype=np.uint16)) & 1
    return np.packbits(planes.astype(np.uint8).reshape(-1))


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    planes = np.unpackbits(packed)[: count * bits].reshape(count, bits).astype(np.uint16)
    return (planes << np.arange(bits, dtype=np.uint16)).sum(axis=1)


def pack_linear(
    weight: torch.Tensor,
    keep: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    group_size: int | None,
    prefix: str,
) -> dict[str, torch.Tensor]:
    codes = quantize_codes(weight.float(), bits, group_size, scale, zero).reshape(weight.shape)
    kept = codes[keep].to(torch.int64).numpy()
    mask_bits = np.packbits(keep.numpy().reshape(-1).astype(np.uint8))
    return {
        f"{prefix}.mask": torch.from_numpy(mask_bits),
        f"{prefix}.codes": torch.from_numpy(pack_bits(kept, bits)),
        f"{prefix}.scale": scale.float().contiguous(),
        f"{prefix}.zero": zero.to(torch.int16).contiguous(),
    }


def unpack_linear(
    tensors: dict[str, torch.Tensor], prefix: str, shape, bits: int, group_size: int | None
) -> torch.Tensor:
    rows, cols = shape
    keep = torch.from_numpy(np.unpackbits(tensors[f"{prefix}.mask"].numpy())[: rows * cols].astype(bool)).reshape(
        rows, cols
    )
    codes = torch.zeros(rows, cols, dtype=torch.float32)
    values = unpack_bits(tensors[f"{prefix}.codes"].numpy(), bits, int(keep.sum()))
    codes[keep] = torch.from_numpy(values.astype(np.float32))
    size = cols if group_size is None else group_size
    grouped = codes.reshape(rows, cols // size, size)
    scale, zero = tensors[f"{prefix}.scale"], tensors[f"{prefix}.zero"].float()
    return dequantize(grouped, scale, zero, (rows, cols)) * keep


class PackedWriter:
    """Writes the packed folder block by block next to the pruned one (a shard per block, then the
    rest of the model in fp16), renamed into place only when complete."""

    def __init__(self, folder: str | Path, shards: int, quant, fresh: bool = True, enabled: bool = True) -> None:
        self.shards = ShardWriter(folder, shards, fresh, enabled)
        self.quant = quant
        self.layers: dict[str, list[int]] = {}

    @torch.no_grad()
    def write_block(self, index: int, block, prefix: str, masks, qparams) -> None:
        tensors = {}
        linears = prunable_linears(block)
        for name, linear in linears.items():
            scale, zero = qparams[name]
            full = prefix + name
            tensors.update(
                pack_linear(
                    linear.weight.detach().cpu(),
                    masks[name].cpu().bool(),
                    scale.cpu(),
                    zero.cpu(),
                    self.quant.bits,
                    self.quant.group_size,
                    full,
                )
            )
        for name, tensor in block.state_dict().items():
            if name.removesuffix(".weight") not in linears:
                tensors[prefix + name] = tensor.detach().cpu().to(torch.float16)
        self.shards.write(index, tensors)

    def finish(self, outer: dict[str, torch.Tensor], config, tokenizer, dtype: torch.dtype) -> Path:
        self.shards.write(self.shards.shards - 1, {k: v.detach().cpu().to(torch.float16) for k, v in outer.items()})
        meta = {
            "format": FORMAT,
            "bits": self.quant.bits,
            "group_size": self.quant.group_size,
            "dtype": str(dtype).removeprefix("torch."),
        }
        return self.shards.finish(config, tokenizer, {"besa_packed.json": json.dumps(meta, indent=2)})


def load_packed(folder: str | Path):
    """(model, tokenizer) rebuilt from a packed folder."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    meta = json.loads((folder / "besa_packed.json").read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{folder} is not a {FORMAT} folder")
    config = AutoConfig.from_pretrained(folder)
    dtype = getattr(torch, meta["dtype"])
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    store = WeightStore(folder)
    tensors = {name: store.get(name) for name in store.files}
    state = {name: tensor for name, tensor in tensors.items() if name.rsplit(".", 1)[-1] not in PACKED_PARTS}
    shapes = dict(model.state_dict().items())
    for prefix in {name.rsplit(".", 1)[0] for name in tensors if name.endswith(".codes")}:
        shape = shapes[f"{prefix}.weight"].shape
        state[f"{prefix}.weight"] = unpack_linear(tensors, prefix, shape, meta["bits"], meta["group_size"])
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    model.tie_weights()
    return model.eval(), AutoTokenizer.from_pretrained(folder)
