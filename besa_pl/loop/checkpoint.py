"""What a besa-pl checkpoint holds, how it is checked on resume, and atomic writing.

A checkpoint never holds the base model's weights. `checkpoint["besa"]` keeps the finished
blocks' records (each names its shard in the pruned folder being written and that shard's
digest), the current block's logits and optimizer state, and fingerprints of the base model,
of the calibration tokens and of every setting that changes the result.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from besa_pl.atomic import atomic_file
from besa_pl.errors import BesaError

FORMAT_VERSION = 2
# Settings added since this format, with the value every earlier checkpoint ran with (the code
# had it fixed): a checkpoint without the key resumes as if it held that value.
ADDED_SETTINGS = {"model.percdamp": 0.01}


def result_settings(pruner, datamodule) -> dict[str, Any]:
    """Every setting that changes the pruned model (resume refuses if one differs), with the number
    of ranks (R ranks take a micro-batch of R times --data.batch_size samples)."""
    settings = dict(pruner.settings.flat())
    settings["trainer.world_size"] = pruner.trainer.world_size
    for key in ("dataset", "nsamples", "seqlen", "seed", "batch_size"):
        settings[f"data.{key}"] = getattr(datamodule, key)
    if datamodule.dataset == "self":
        settings.update({f"data.generation.{k}": v for k, v in dataclasses.asdict(datamodule.generation).items()})
    return settings


def loop_state(records: list[dict], pruner, datamodule) -> dict[str, Any]:
    return {
        "version": FORMAT_VERSION,
        "block_index": len(records),
        "block_logs": records,
        "block_state": pruner.trainable_state(),
        "settings": result_settings(pruner, datamodule),
        "model_fingerprint": pruner.open_source().fingerprint,
        "calibration_fingerprint": datamodule.fingerprint,
    }


def check_resume(checkpoint: dict[str, Any], pruner, datamodule) -> dict[str, Any]:
    """The checkpoint's besa section, after checking it belongs to this model, data and settings."""
    state = checkpoint.get("besa")
    if not isinstance(state, dict) or state.get("version") != FORMAT_VERSION:
        raise BesaError(
            "ckpt_path: not a besa-pl checkpoint of this version (no 'besa' section of format "
            f"{FORMAT_VERSION}); give a checkpoint that this besa-pl wrote, or start again"
        )
    now = pruner.open_source().fingerprint
    if state.get("model_fingerprint") != now:
        raise BesaError(
            "ckpt_path: the checkpoint was made from a different base model "
            f"(fingerprint {state.get('model_fingerprint')} vs {now}); resume with the same "
            "model.pretrained or start a new run in another trainer.default_root_dir"
        )
    saved, current = {**ADDED_SETTINGS, **state["settings"]}, result_settings(pruner, datamodule)
    differ = [key for key in sorted(set(saved) | set(current)) if saved.get(key) != current.get(key)]
    if differ:
        listed = ", ".join(f"{key}={saved.get(key)!r} in the checkpoint but {current.get(key)!r} now" for key in differ)
        raise BesaError(
            f"ckpt_path: settings differ from the checkpoint's: {listed}; resume with the same settings or start a new run"
        )
    if state.get("calibration_fingerprint") != datamodule.fingerprint:
        raise BesaError(
            "ckpt_path: the calibration tokens differ from the checkpoint's (another data folder, dataset file or "
            "tokenizer); resume with the same data or start a new run"
        )
    return state


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file and rename, so a crash never leaves a complete-looking file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        with atomic_file(path, sync=True) as tmp:
            torch.save(checkpoint, tmp)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        if not os.path.exists(path):
            raise BesaError(f"ckpt_path={path}: no such checkpoint; give an existing file or 'last'")
        try:
            return torch.load(path, map_location=map_location or "cpu", weights_only=False)
        # What a damaged file raises (torch 2.13): the zip reader's RuntimeError, pickle's errors, an
        # empty file's EOFError, a ValueError (UnicodeDecodeError) from flipped bytes, a read error.
        except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, OSError) as error:
            raise BesaError(
                f"ckpt_path={path}: the checkpoint is corrupt or truncated ({type(error).__name__}); "
                "use an earlier checkpoint or start again"
            ) from error
