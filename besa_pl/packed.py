"""A packed form of a pruned + quantized model that really saves bytes, and its loader.

Per prunable linear: the keep-mask (1 bit per weight), the integer codes of the kept weights
only (`bits` bits each), and per-group scale (fp32) and zero-point (int16). Everything else
(embeddings, norms, LM head) is stored in fp16. Unpacking reproduces the exported
dequantized weights exactly.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .models import decoder_blocks, prunable_linears
from .quant import dequantize, quantize_codes

FORMAT = "besa-pl-packed-v1"


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned integers < 2^bits -> a little-endian bit stream in uint8."""
    planes = (values.astype(np.uint16)[:, None] >> np.arange(bits, dtype=np.uint16)) & 1
    return np.packbits(planes.astype(np.uint8).reshape(-1))


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    planes = np.unpackbits(packed)[: count * bits].reshape(count, bits).astype(np.uint16)
    return (planes << np.arange(bits, dtype=np.uint16)).sum(axis=1)


def pack_linear(weight: torch.Tensor, keep: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                bits: int, group_size: int | None, prefix: str) -> dict[str, torch.Tensor]:
    codes = quantize_codes(weight.float(), bits, group_size, scale, zero).reshape(weight.shape)
    kept = codes[keep].to(torch.int64).numpy()
    mask_bits = np.packbits(keep.numpy().reshape(-1).astype(np.uint8))
    return {
        f"{prefix}.mask": torch.from_numpy(mask_bits),
        f"{prefix}.codes": torch.from_numpy(pack_bits(kept, bits)),
        f"{prefix}.scale": scale.float().contiguous(),
        f"{prefix}.zero": zero.to(torch.int16).contiguous(),
    }


def unpack_linear(tensors: dict[str, torch.Tensor], prefix: str, shape, bits: int, group_size: int | None) -> torch.Tensor:
    rows, cols = shape
    keep = torch.from_numpy(np.unpackbits(tensors[f"{prefix}.mask"].numpy())[: rows * cols].astype(bool)).reshape(rows, cols)
    codes = torch.zeros(rows, cols, dtype=torch.float32)
    values = unpack_bits(tensors[f"{prefix}.codes"].numpy(), bits, int(keep.sum()))
    codes[keep] = torch.from_numpy(values.astype(np.float32))
    size = cols if group_size is None else group_size
    grouped = codes.reshape(rows, cols // size, size)
    scale, zero = tensors[f"{prefix}.scale"], tensors[f"{prefix}.zero"].float()
    return dequantize(grouped, scale, zero, (rows, cols)) * keep


@torch.no_grad()
def save_packed(pruner, folder: str | Path) -> Path:
    """Write the packed model folder (atomically: temporary folder, then rename)."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model, quant = pruner.model, pruner.quant
    tensors: dict[str, torch.Tensor] = {}
    packed_names = set()
    layers = {}
    for index, block in enumerate(decoder_blocks(model)):
        for name, linear in prunable_linears(block).items():
            full = next(n for n, m in model.named_modules() if m is linear)
            scale, zero = pruner.quant_params[index][name]
            keep = pruner.masks[index][name].bool()
            tensors.update(pack_linear(linear.weight.detach().cpu(), keep, scale, zero, quant.bits, quant.group_size, full))
            packed_names.add(f"{full}.weight")
            layers[full] = list(linear.weight.shape)
    seen = set()
    for name, tensor in model.state_dict().items():
        if name not in packed_names and tensor.data_ptr() not in seen:  # tied weights once
            seen.add(tensor.data_ptr())
            tensors[name] = tensor.detach().cpu().to(torch.float16).contiguous()
    save_file(tensors, tmp / "model.safetensors")
    model.config.save_pretrained(tmp)
    pruner.tokenizer.save_pretrained(tmp)
    meta = {"format": FORMAT, "bits": quant.bits, "group_size": quant.group_size, "layers": layers,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
    (tmp / "besa_packed.json").write_text(json.dumps(meta, indent=2))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


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
    tensors = load_file(str(folder / "model.safetensors"))
    state = {name: tensor for name, tensor in tensors.items() if not name.rsplit(".", 1)[-1] in ("mask", "codes", "scale", "zero")}
    for prefix, shape in meta["layers"].items():
        state[f"{prefix}.weight"] = unpack_linear(tensors, prefix, shape, meta["bits"], meta["group_size"])
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    model.tie_weights()
    return model.eval(), AutoTokenizer.from_pretrained(folder)


def fp16_bytes(model) -> int:
    """Bytes of the model's weights in fp16, tied tensors once."""
    unique = {t.data_ptr(): t.numel() for t in model.state_dict().values()}
    return 2 * sum(unique.values())


def folder_bytes(folder: str | Path) -> int:
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())
