"""What can be checked before any work, so a run that cannot finish refuses at once, in one line.

- every safetensors file of the model folder is there, readable and as long as its header says
  (a truncated download otherwise ends in a library traceback, possibly hours in);
- the output folder can be created and written to;
- the calibration activations (docs/memory.md: 2 or 3 buffers of N x T x H) fit in the RAM.

Reading the headers never maps a weight.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from besa_pl.errors import BesaError
from besa_pl.models.memory import available_bytes
from besa_pl.offline import cache_dir

INDEX_FILE = "model.safetensors.index.json"
HEADER_LIMIT = 100_000_000  # safetensors refuses larger headers; a larger length means a corrupt file

# Bytes per element of each safetensors dtype.
DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
}
ACTIVATION_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _refetch_hint(folder: Path) -> str:
    if cache_dir() in folder.resolve().parents:
        return f"delete {folder} and run again (besa-pl converts it again)"
    return "download or copy the model again"


def _header_tensors(path: Path, setting: str, fix: str) -> set[str]:
    """The tensor names of one safetensors file, after checking the file holds all they need."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            length = int.from_bytes(prefix, "little") if len(prefix) == 8 else 0
            if len(prefix) < 8 or (length <= HEADER_LIMIT and 8 + length > size):
                raise BesaError(f"{setting}: {path} is truncated ({size} bytes, shorter than its header); {fix}")
            if length > HEADER_LIMIT:
                raise BesaError(f"{setting}: {path} is not a safetensors file (its header length is corrupt); {fix}")
            raw = handle.read(length)
    except OSError as error:
        raise BesaError(f"{setting}: cannot read {path} ({error.strerror}); check its permissions or {fix}") from error
    try:
        header = json.loads(raw)
        tensors = {name: info for name, info in header.items() if name != "__metadata__"}
        end = max((int(info["data_offsets"][1]) for info in tensors.values()), default=0)
        for info in tensors.values():
            begin, stop = (int(offset) for offset in info["data_offsets"])
            count = 1
            for extent in info["shape"]:
                count *= int(extent)
            itemsize = DTYPE_BYTES.get(info["dtype"])
            if stop < begin or (itemsize is not None and stop - begin != count * itemsize):
                raise ValueError(f"tensor offsets disagree with its shape {info['shape']}")
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as error:  # UnicodeDecodeError is a ValueError
        raise BesaError(f"{setting}: {path} has a corrupt header ({type(error).__name__}); {fix}") from error
    if 8 + length + end > size:
        raise BesaError(
            f"{setting}: {path} is truncated ({size} bytes, its header describes {8 + length + end}); {fix}"
        )
    return set(tensors)


def check_weight_files(folder: str | Path, setting: str = "model.pretrained") -> None:
    """Every shard the index names exists and holds its tensors; every safetensors file is complete."""
    folder = Path(folder)
    fix = _refetch_hint(folder)
    index = folder / INDEX_FILE
    if not index.exists():
        for path in sorted(folder.glob("*.safetensors")):
            _header_tensors(path, setting, fix)
        return
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise BesaError(
            f"{setting}: {index} is unreadable or has no weight_map ({type(error).__name__}); {fix}"
        ) from error
    missing = [shard for shard in shards if not (folder / shard).is_file()]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise BesaError(f"{setting}: the shard {folder / missing[0]}{more} named in {INDEX_FILE} is missing; {fix}")
    held = {shard: _header_tensors(folder / shard, setting, fix) for shard in shards}
    for name, shard in weight_map.items():
        if name not in held[shard]:
            raise BesaError(f"{setting}: {folder / shard} lacks {name}, which {INDEX_FILE} places there; {fix}")


def check_output_folder(root: str | Path, setting: str = "trainer.default_root_dir") -> None:
    """The run's folder exists (created here if need be) and a file can be written in it."""
    root = Path(root)
    fix = "choose a folder you can write to"
    if root.exists() and not root.is_dir():
        raise BesaError(f"{setting}={root}: a file, not a folder; {fix}")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BesaError(f"{setting}={root}: cannot be created ({error.strerror}); {fix}") from error
    try:
        with tempfile.NamedTemporaryFile(dir=root, prefix=".besa-write-test-"):
            pass
    except OSError as error:
        raise BesaError(f"{setting}={root}: cannot be written to ({error.strerror}); {fix}") from error


def activation_bytes(
    nsamples: int, seqlen: int, hidden_size: int, activation_dtype: str, dense_trajectory: bool
) -> int:
    """docs/memory.md: inputs and targets (and the dense trajectory), N x T x H each, all ranks together."""
    buffers = 3 if dense_trajectory else 2
    return buffers * nsamples * seqlen * hidden_size * ACTIVATION_BYTES[activation_dtype]


def available_ram_bytes() -> int:
    return available_bytes("cpu")


def _gb(count: int) -> str:
    return f"{count / 1e9:.1f} GB"


def check_activation_memory(
    nsamples: int, seqlen: int, hidden_size: int, activation_dtype: str, dense_trajectory: bool, machines: int = 1
) -> None:
    """The activations live in CPU memory (pinned with a GPU), on every machine its ranks' share."""
    need = activation_bytes(nsamples, seqlen, hidden_size, activation_dtype, dense_trajectory) // max(machines, 1)
    have = available_ram_bytes()
    if need <= have:
        return
    buffers = 3 if dense_trajectory else 2
    fixes = ["lower data.nsamples or data.seqlen"]
    if ACTIVATION_BYTES[activation_dtype] > 2:
        fixes.append("store them in half the memory with --model.activation_dtype bfloat16")
    fixes.append("or share the samples over several machines (--trainer.strategy ddp --trainer.num_nodes)")
    raise BesaError(
        f"data.nsamples={nsamples} x data.seqlen={seqlen}: the calibration activations need {_gb(need)} of RAM "
        f"({buffers} x {nsamples} x {seqlen} x hidden {hidden_size} x {ACTIVATION_BYTES[activation_dtype]} bytes"
        f"{f' / {machines} machines' if machines > 1 else ''}) but {_gb(have)} is available; {', '.join(fixes)}"
    )


def check_before_fit(trainer, pruner, datamodule) -> None:
    """All of the above for a fit: output folder, weight files (with the model source), activations."""
    check_output_folder(trainer.default_root_dir)
    settings = pruner.settings
    source = pruner.open_source()  # checks the weight files
    if not settings.pruning or os.environ.get("LOCAL_RANK", "0") != "0":
        return  # the dense row stores no activations; one check per machine, before its ranks start
    config = source.config.get_text_config() if hasattr(source.config, "get_text_config") else source.config
    check_activation_memory(
        datamodule.nsamples,
        datamodule.seqlen,
        config.hidden_size,
        settings.activation_dtype or settings.dtype,
        settings.dense_trajectory,
        machines=trainer.num_nodes,
    )
