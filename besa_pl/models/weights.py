"""Weights that stay on disk until their block's turn, and the pruned folder written block by block.

A model is built as a skeleton on the meta device (no memory); the parts outside the decoder
blocks (embeddings, final norm, LM head: what the capture and the evaluation need) are read at
once, each block only when it is pruned, and freed after it is written. Safetensors files are
memory-mapped, so reading a block touches only its bytes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from besa_pl.atomic import atomic_file, swap_folder
from besa_pl.preflight import DTYPE_BYTES, INDEX_FILE


class WeightStore:
    """The tensors of a safetensors model folder (one file or an indexed set of shards), by name.

    Reads copy the tensors out of a file mapping that is closed right after, so neither edits of a
    loaded weight reach the file's pages nor do the pages of finished blocks stay mapped.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: self.folder / file for name, file in weight_map.items()}
        else:
            self.files = {}
            for path in sorted(self.folder.glob("*.safetensors")):
                with safe_open(str(path), "pt") as handle:
                    self.files.update({name: path for name in handle.keys()})

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get_many(self, names: list[str]) -> dict[str, torch.Tensor]:
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        out = {}
        for path, wanted in by_file.items():
            with safe_open(str(path), "pt") as handle:
                for name in wanted:
                    out[name] = handle.get_tensor(name).clone()
        return out

    def get(self, name: str) -> torch.Tensor:
        return self.get_many([name])[name]

    def _slices(self, names: list[str], read):
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        for path, wanted in by_file.items():
            with safe_open(str(path), "pt") as handle:
                for name in wanted:
                    yield name, read(handle.get_slice(name))

    def samples(self) -> dict[str, tuple[tuple[int, ...], str, torch.Tensor]]:
        """(shape, dtype, the first and last row) of every tensor, read without loading the rest: what
        the model's fingerprint hashes."""
        return dict(self._slices(sorted(self.files), _sample))

    def numel(self) -> int:
        """Elements of all tensors, from the file headers."""
        return sum(n for _, n in self._slices(list(self.files), lambda piece: _numel(piece.get_shape())))


def _sample(piece) -> tuple[tuple[int, ...], str, torch.Tensor]:
    shape = tuple(piece.get_shape())
    if not shape:
        return shape, piece.get_dtype(), piece[...].reshape(1).float().clone()
    if len(shape) == 1:
        return shape, piece.get_dtype(), piece[0 : min(shape[0], 4096)].float().clone()
    rows = torch.cat([piece[0:1].reshape(-1), piece[shape[0] - 1 : shape[0]].reshape(-1)])
    return shape, piece.get_dtype(), rows.float()


def has_safetensors(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / INDEX_FILE).exists() or any(folder.glob("*.safetensors"))


def module_prefix(model: nn.Module, module: nn.Module) -> str:
    """`model.layers.3.` for the fourth decoder block of a LLaMA-like model."""
    return next(name for name, m in model.named_modules() if m is module) + "."


def _set_parameter(module: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    setattr(owner, leaf, nn.Parameter(value, requires_grad=False))  # replaces the registered parameter


@torch.no_grad()
def materialize(module: nn.Module, prefix: str, store: WeightStore, device, dtype: torch.dtype) -> int:
    """Read every meta parameter of `module` from `store` onto `device`; returns how many elements."""
    count = 0
    # Parameters stored under another name (a tied LM head) are tied afterwards.
    wanted = {
        name: prefix + name
        for name, p in module.named_parameters()
        if p.device.type == "meta" and prefix + name in store
    }
    values = store.get_many(list(wanted.values()))
    for name, key in wanted.items():
        value = values[key]
        value = value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
        _set_parameter(module, name, value)
        count += value.numel()
    return count


@torch.no_grad()
def release(module: nn.Module) -> None:
    """Free a block's weights: its parameters go back to the meta device."""
    for name, parameter in list(module.named_parameters()):
        _set_parameter(module, name, torch.empty_like(parameter, device="meta"))


def build_skeleton(folder: str | Path, dtype: torch.dtype):
    """The model with every parameter on the meta device (buffers such as rotary tables are real)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


class ShardWriter:
    """Writes a Hugging Face model folder one safetensors shard at a time.

    Shards go into `<folder>.partial`; `finish` adds the index, config and tokenizer and renames the
    whole folder into place, so a run that dies never leaves a finished-looking `folder`. Each shard
    is written to a temporary name and renamed, so a shard that exists is complete.
    """

    def __init__(self, folder: str | Path, shards: int, fresh: bool = True, enabled: bool = True) -> None:
        self.folder = Path(folder)
        self.staging = self.folder.with_name(self.folder.name + ".partial")
        self.shards = shards
        self.enabled = enabled  # under DDP only rank 0 writes
        if enabled and fresh and self.staging.exists():
            shutil.rmtree(self.staging)
        if enabled:
            self.staging.mkdir(parents=True, exist_ok=True)

    def shard_name(self, index: int) -> str:
        return f"model-{index + 1:05d}-of-{self.shards:05d}.safetensors"

    def shard_path(self, index: int) -> Path:
        return self.staging / self.shard_name(index)

    def write(self, index: int, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
        path = self.shard_path(index)
        if not self.enabled:
            return path
        with atomic_file(path) as tmp:
            save_file(
                {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()},
                str(tmp),
                metadata=metadata or {"format": "pt"},
            )
        return path

    def finish(self, config, tokenizer, extra_files: dict[str, str] | None = None) -> Path:
        if not self.enabled:
            return self.folder
        weight_map, total = {}, 0
        for index in range(self.shards):
            path = self.shard_path(index)
            with safe_open(str(path), "pt") as handle:
                for name in handle.keys():
                    weight_map[name] = path.name
                    piece = handle.get_slice(name)
                    total += _numel(piece.get_shape()) * DTYPE_BYTES.get(piece.get_dtype(), 4)
        index_data = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.staging / INDEX_FILE).write_text(json.dumps(index_data, indent=2) + "\n")
        if config is not None:
            config.save_pretrained(self.staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(self.staging)
        for name, text in (extra_files or {}).items():
            (self.staging / name).write_text(text)
        swap_folder(self.staging, self.folder)
        return self.folder


def _numel(shape) -> int:
    count = 1
    for size in shape:
        count *= size
    return count
