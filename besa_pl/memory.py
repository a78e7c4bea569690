"""How much memory a device has free, and how much a saved model needs."""

from __future__ import annotations

from pathlib import Path

import psutil
import torch


def available_bytes(device) -> int:
    """Free memory on `device`: the GPU's free memory, or the host's available RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return int(psutil.virtual_memory().available)


def folder_bytes(folder: str | Path) -> int:
    """Bytes of the weight files in a model folder (what loading it whole takes)."""
    return sum(path.stat().st_size for path in Path(folder).glob("*.safetensors"))
