"""Writing results: the pruned HF folder, sparsity.json and results.json, all atomically."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from .models import decoder_blocks, prunable_linears

FINISHED_MARKER = "sparsity.json"


def write_json_atomic(path: str | Path, data: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=float) + "\n")
    os.replace(tmp, path)


def save_folder_atomic(model, tokenizer, folder: str | Path) -> Path:
    """save_pretrained into a temporary sibling folder, then swap it in."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


@torch.no_grad()
def realised_sparsity(model) -> dict[str, Any]:
    """Fraction of exact zeros in every prunable linear, per block and overall (from the weights)."""
    blocks = {}
    zeros_total = weights_total = 0
    for index, block in enumerate(decoder_blocks(model)):
        layers = {}
        zeros_block = weights_block = 0
        for name, linear in prunable_linears(block).items():
            zeros = int((linear.weight == 0).sum())
            layers[name] = zeros / linear.weight.numel()
            zeros_block += zeros
            weights_block += linear.weight.numel()
        blocks[str(index)] = {"sparsity": zeros_block / weights_block, "layers": layers}
        zeros_total += zeros_block
        weights_total += weights_block
    return {"overall": zeros_total / weights_total, "blocks": blocks}


def sparsity_report(pruner) -> dict[str, Any]:
    report = realised_sparsity(pruner.model)
    report["method"] = pruner.hparams.method
    report["target"] = pruner.target_sparsity
    report["structure"] = pruner.hparams.structure
    report["learned_rates"] = {str(k): v for k, v in pruner.learned.items()}
    report["expected_sparsity"] = {str(e["block"]): e["expected_sparsity"] for e in pruner.block_logs}
    return report


def is_finished_run(root: str | Path) -> bool:
    return (Path(root) / FINISHED_MARKER).exists()
