"""What a besa-pl checkpoint holds, how it is checked on resume, and atomic writing.

A checkpoint never holds the base model's weights: only the finished blocks' masks
(bit-packed), the current block's logits (its optimizer state is Lightning's), the loop
position and fingerprints of the base model and of every setting that changes the result.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from .errors import BesaError

FORMAT_VERSION = 1


@dataclass
class ResumeState:
    block_state: dict[str, torch.Tensor] | None


def model_fingerprint(obj) -> str:
    """Short hash of a model's parameters (names, shapes, strided samples) or of one tensor."""
    digest = hashlib.sha256()
    tensors = obj.named_parameters() if isinstance(obj, torch.nn.Module) else [("tensor", obj)]
    for name, tensor in tensors:
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].to("cpu", torch.float64)
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def block_fingerprint_settings(hparams: dict[str, Any], datamodule) -> dict[str, Any]:
    settings = {}
    for key, value in hparams.items():
        if key == "pretrained":
            continue  # the weights' fingerprint stands for the model, wherever its folder is
        if dataclasses.is_dataclass(value):
            settings.update({f"model.{key}.{k}": v for k, v in dataclasses.asdict(value).items()})
        else:
            settings[f"model.{key}"] = value
    for key in ("dataset", "nsamples", "seqlen", "seed", "batch_size"):
        settings[f"data.{key}"] = getattr(datamodule, key)
    return settings


def pack_mask(mask: torch.Tensor) -> dict[str, Any]:
    bits = np.packbits(mask.cpu().numpy().reshape(-1).astype(np.uint8))
    return {"shape": list(mask.shape), "bits": torch.from_numpy(bits)}


def unpack_mask(packed: dict[str, Any]) -> torch.Tensor:
    shape = packed["shape"]
    count = int(np.prod(shape))
    bits = np.unpackbits(packed["bits"].numpy())[:count]
    return torch.from_numpy(bits.astype(bool)).reshape(shape)


def dump_state(pruner) -> dict[str, Any]:
    return {
        "version": FORMAT_VERSION,
        "block_index": pruner.block_index,
        "masks": {i: {name: pack_mask(m) for name, m in masks.items()} for i, masks in pruner.masks.items()},
        "learned": pruner.learned,
        "block_logs": pruner.block_logs,
        "block_state": pruner.current.trainable_state() if pruner.current is not None else None,
        "quant_params": pruner.quant_params,
        "clipping": pruner.clipping,
        "settings": pruner.result_settings(),
        "model_fingerprint": pruner.fingerprint(),
        "calibration_fingerprint": pruner.calibration_fingerprint,
    }


def _check_compatible(pruner, state: dict[str, Any]) -> None:
    if state.get("model_fingerprint") != pruner.fingerprint():
        raise BesaError(
            "ckpt_path: the checkpoint was made from a different base model "
            f"(fingerprint {state.get('model_fingerprint')} vs {pruner.fingerprint()}); resume with the same "
            "model.pretrained or start a new run in another trainer.default_root_dir"
        )
    saved, now = state["settings"], pruner.result_settings()
    differ = [key for key in sorted(set(saved) | set(now)) if saved.get(key) != now.get(key)]
    if differ:
        listed = ", ".join(f"{key}={saved.get(key)!r} in the checkpoint but {now.get(key)!r} now" for key in differ)
        raise BesaError(f"ckpt_path: settings differ from the checkpoint's: {listed}; resume with the same settings or start a new run")
    if state.get("calibration_fingerprint") != pruner.calibration_fingerprint:
        raise BesaError(
            "ckpt_path: the calibration tokens differ from the checkpoint's (another data folder, dataset file or "
            "tokenizer); resume with the same data or start a new run"
        )


@torch.no_grad()
def load_state(pruner, checkpoint: dict[str, Any]) -> ResumeState:
    """Check a checkpoint against this run, then replay the finished blocks to rebuild the cache."""
    state = checkpoint.get("besa")
    if not isinstance(state, dict) or state.get("version") != FORMAT_VERSION:
        raise BesaError("ckpt_path: not a besa-pl checkpoint (no 'besa' section of this format); give a checkpoint that besa-pl wrote")
    _check_compatible(pruner, state)
    finished = state["block_index"]
    masks = {i: {name: unpack_mask(p) for name, p in block.items()} for i, block in state["masks"].items()}
    for index in range(finished):
        pruner.block_index = index
        if pruner.hparams.method == "sparsegpt":
            # SparseGPT also updates the kept weights while it chooses the mask: redo it (deterministic).
            pruner.prepare_block()
            pruner.finish_block()
        else:
            pruner.replay_block(masks[index], state["quant_params"].get(index), state["clipping"].get(index))
    pruner.masks = masks
    pruner.learned = state["learned"]
    pruner.quant_params = state["quant_params"]
    pruner.clipping = state["clipping"]
    pruner.block_logs = list(state["block_logs"])
    pruner.block_index = finished
    pruner.prepared = False
    pruner.resumed = True
    return ResumeState(block_state=state["block_state"])


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file and rename, so a crash never leaves a complete-looking file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = str(path)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            with open(tmp, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        if not os.path.exists(path):
            raise BesaError(f"ckpt_path={path}: no such checkpoint; give an existing file or 'last'")
        try:
            return torch.load(path, map_location=map_location or "cpu", weights_only=False)
        except Exception as error:
            raise BesaError(
                f"ckpt_path={path}: the checkpoint is corrupt or truncated ({type(error).__name__}); "
                "use an earlier checkpoint or start again"
            ) from error
