"""ModelSource: one model's files, with only the parts in use in memory.

The skeleton is built on the meta device; what lies outside the decoder blocks (embeddings,
final norm, LM head) is read at once, each block only when `load_block` asks for it, and
`release_block` frees it again. `peak_block_elements` records the most block weights that were
ever materialised at once (the tests hold the streaming promise to it).
"""

from __future__ import annotations

import tempfile
import weakref
from pathlib import Path

import torch
from torch import nn

from besa_pl.errors import BesaError
from besa_pl.fingerprint import model_fingerprint
from besa_pl.models.loading import (
    decoder_blocks,
    freeze,
    load_tokenizer,
    model_folder,
    prunable_linears,
    torch_dtype,
)
from besa_pl.models.memory import available_bytes, folder_bytes, return_freed_memory
from besa_pl.models.weights import (
    WeightStore,
    build_skeleton,
    materialize,
    module_prefix,
    release,
)
from besa_pl.preflight import check_weight_files
from besa_pl.settings import PruneSettings


class ModelSource:
    def __init__(self, pretrained: str, settings: PruneSettings) -> None:
        from transformers import AutoConfig

        self.pretrained = pretrained
        self.settings = settings
        self.folder: Path = model_folder(pretrained)
        check_weight_files(self.folder)  # a truncated or missing shard fails here, not blocks later
        self.dtype = torch_dtype(settings.dtype)
        self.tokenizer = load_tokenizer(self.folder)
        self.config = AutoConfig.from_pretrained(self.folder)
        self._model: nn.Module | None = None
        self._store: WeightStore | None = None
        self.loaded: dict[int, int] = {}  # block index -> materialised elements
        self.peak_block_elements = 0
        self._evaluation = None
        self._fingerprint: str | None = None
        if settings.pruning:
            self.model  # noqa: B018  # builds the skeleton now, so an unsupported family fails before any work

    @property
    def fingerprint(self) -> str:
        """Of the base weights (resume refuses a checkpoint made from another model)."""
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.store)
        return self._fingerprint

    @property
    def store(self) -> WeightStore:
        if self._store is None:
            self._store = WeightStore(self.folder)
        return self._store

    @property
    def model(self) -> nn.Module:
        """The skeleton: blocks on the meta device, everything else read from the files (on the CPU)."""
        if self._model is None:
            model = build_skeleton(self.folder, self.dtype)
            self._model = freeze(model)
            blocks = decoder_blocks(model)
            self._prefixes = [module_prefix(model, block) for block in blocks]
            inside = {id(p) for block in blocks for p in block.parameters()}
            for name, module in model.named_modules():
                own = [p for p in module.parameters(recurse=False) if id(p) not in inside]
                if own:
                    materialize_own(module, name, self.store, self.dtype)
            model.tie_weights()
            missing = [name for name, p in model.named_parameters() if p.device.type == "meta" and id(p) not in inside]
            if missing:
                raise BesaError(
                    f"model.pretrained={self.pretrained}: the weight files lack {', '.join(missing[:3])}; "
                    "give a complete Hugging Face model folder"
                )
        return self._model

    @property
    def blocks(self) -> nn.ModuleList:
        return decoder_blocks(self.model)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def block_prefix(self, index: int) -> str:
        self.model  # noqa: B018 (builds the skeleton and the prefixes)
        return self._prefixes[index]

    def load_block(self, index: int, device, store: WeightStore | None = None) -> nn.Module:
        """Block `index` with its weights read from `store` (default: the source files) onto `device`."""
        block = self.blocks[index]
        self.loaded[index] = materialize(block, self.block_prefix(index), store or self.store, device, self.dtype)
        self.peak_block_elements = max(self.peak_block_elements, sum(self.loaded.values()))
        return block

    def linear_weights(self, folder: Path):
        """(name, weight) of every prunable linear of every block of a saved folder, one at a time."""
        store = WeightStore(folder)
        for index, block in enumerate(self.blocks):
            for name in prunable_linears(block):
                yield name, store.get(f"{self.block_prefix(index)}{name}.weight")

    def release_block(self, index: int) -> None:
        release(self.blocks[index])
        self.loaded.pop(index, None)
        return_freed_memory()  # else the resident memory grows with depth

    def outer_tensors(self) -> dict[str, torch.Tensor]:
        """Every weight outside the decoder blocks (a tied LM head once), as save_pretrained names them."""
        return {name: p for name, p in self.model.named_parameters() if not name.startswith(tuple(self._prefixes))}

    def move_outer(self, device) -> None:
        """Embeddings, norms, head and their buffers to `device` (the blocks stay where they are)."""
        inside = {id(t) for block in self.blocks for t in [*block.parameters(), *block.buffers()]}
        for module in self.model.modules():
            for key, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                if id(tensor) not in inside and tensor.device.type != "meta":
                    moved = tensor.to(device)
                    # setattr replaces a registered parameter or buffer (and keeps a buffer's persistence)
                    setattr(
                        module,
                        key,
                        nn.Parameter(moved, requires_grad=False) if isinstance(tensor, nn.Parameter) else moved,
                    )
        self.model.tie_weights()

    # ------------------------------------------------------------ evaluation
    def evaluation_model(self, trainer, offload: bool = False):
        """(model, device): the finished model loaded whole when it fits, else None (see the README's Limits)."""
        from transformers import AutoModelForCausalLM

        device = trainer.strategy.root_device
        folder = self.evaluation_folder(trainer)
        if self._evaluation is not None:
            return self._evaluation, device
        need, have = folder_bytes(folder), available_bytes(device)
        if need < 0.8 * have:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=self.dtype)
            self._evaluation = freeze(model).to(device)
            return self._evaluation, device
        if offload:
            return offloaded_model(folder, self.dtype), device
        return None, device

    def generation_model(self, device):
        """(model, device) of the source model, whole, for writing self-calibration text."""
        from transformers import AutoModelForCausalLM

        if folder_bytes(self.folder) < 0.8 * available_bytes(device):
            return freeze(AutoModelForCausalLM.from_pretrained(self.folder, dtype=self.dtype)).to(device), device
        model = offloaded_model(self.folder, self.dtype)
        return model, next(model.parameters()).device

    def evaluation_folder(self, trainer) -> Path:
        """The pruned folder this run wrote, or the source itself for `dense` (evaluation only)."""
        return Path(trainer.default_root_dir) / "pruned" if self.settings.pruning else self.folder

    def close_evaluation(self) -> None:
        self._evaluation = None


def materialize_own(module: nn.Module, name: str, store: WeightStore, dtype) -> None:
    """Read a module's own (non-recursive) meta parameters from the store onto the CPU."""
    prefix = f"{name}." if name else ""
    for key, parameter in list(module.named_parameters(recurse=False)):
        if parameter.device.type != "meta" or prefix + key not in store:
            continue
        value = store.get(prefix + key)
        value = value.to(dtype=dtype) if value.is_floating_point() else value
        setattr(module, key, nn.Parameter(value, requires_grad=False))


def offloaded_model(folder: Path, dtype):
    """The model of `folder` placed by accelerate over the devices, the RAM and a temporary offload
    folder; the folder is removed when the model is garbage-collected (or at exit)."""
    from transformers import AutoModelForCausalLM

    offload = tempfile.TemporaryDirectory(prefix="besa-offload-")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, device_map="auto", offload_folder=offload.name
        )
    except BaseException:
        offload.cleanup()
        raise
    weakref.finalize(model, offload.cleanup)
    return freeze(model)
