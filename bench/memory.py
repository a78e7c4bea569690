"""Peak memory of pruning, against the model's depth and size (prints figures; not a test).

Synthetic LLaMA-shaped checkpoints with random weights are written once (safetensors, bf16) to a
cache folder; each pruning runs in its own process, whose peak RSS (and peak GPU memory on a GPU)
is reported.

    python bench/memory.py depth                    # 8 vs 32 blocks, Wanda and BESA
    python bench/memory.py 7b                       # a LLaMA-2-7B-shaped model (13.5 GB), Wanda

The depth comparison should show a flat peak: only the block being pruned is ever materialised.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

SHAPES = {
    # name: (hidden, intermediate, heads, kv heads, vocab)
    "small": (1024, 2816, 8, 8, 32000),
    "7b": (4096, 11008, 32, 32, 32000),
}


def checkpoint(shape: str, blocks: int) -> Path:
    """A random LLaMA-shaped model folder (one safetensors shard per block), written once."""
    from besa_pl.offline import cache_dir

    folder = cache_dir() / "synthetic" / f"llama-{shape}-{blocks}"
    if (folder / "model.safetensors.index.json").exists():
        return folder
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    hidden, intermediate, heads, kv_heads, vocab = SHAPES[shape]
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=blocks,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    with init_empty_weights():
        model = LlamaForCausalLM(config)
    staging = Path(tempfile.mkdtemp(dir=folder.parent if folder.parent.exists() else None))
    generator = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    groups: dict[str, dict] = {}
    for name, parameter in model.named_parameters():
        key = name.split(".layers.")[1].split(".")[0] if ".layers." in name else "outer"
        groups.setdefault(key, {})[name] = parameter.shape
    for number, shapes in enumerate(groups.values()):
        file = f"model-{number + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, size in shapes.items():
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(size, dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(size, generator=generator) * 0.02).to(torch.bfloat16)
            weight_map[name] = file
            total += tensors[name].numel() * 2
        save_file(tensors, str(staging / file), metadata={"format": "pt"})
        del tensors
    (staging / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    config.save_pretrained(staging)
    word_level = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=word_level, bos_token="w1", eos_token="w2").save_pretrained(staging)
    folder.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, folder)
    return folder


def text_file() -> Path:
    """Calibration text for the synthetic word-level tokenizer (words w0 ... w31999)."""
    import random

    path = Path(tempfile.gettempdir()) / "besa-bench-words.txt"
    if not path.exists():
        rng = random.Random(0)
        path.write_text(" ".join(f"w{rng.randrange(32000)}" for _ in range(200_000)))
    return path


def prune_in_child(folder: Path, method: str, nsamples: int, seqlen: int, dtype: str, device: str) -> dict:
    """Prune in a fresh process; returns its peak RSS, peak GPU memory and wall time."""
    code = f"""
import json, resource, sys, time, torch
from besa_pl import BESAPruner, CalibrationDataModule
from besa_pl.loop.trainer import make_trainer
start = time.perf_counter()
pruner = BESAPruner(pretrained={str(folder)!r}, method={method!r}, dtype={dtype!r})
data = CalibrationDataModule(dataset={str(text_file())!r}, nsamples={nsamples}, seqlen={seqlen})
trainer = make_trainer({tempfile.mkdtemp(prefix="besa-memory-")!r}, accelerator={"gpu" if device == "cuda" else "cpu"!r},
                       devices=1, logger=False, enable_progress_bar=False)
trainer.fit(pruner, datamodule=data)
print("RESULT", json.dumps({{"wall_s": time.perf_counter() - start,
    "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
    "peak_block_elements": pruner.source.peak_block_elements}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    line = next((text for text in out.stdout.splitlines() if text.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"pruning failed:\n{out.stderr[-3000:]}")
    return json.loads(line.removeprefix("RESULT "))


def depth(args) -> None:
    print(
        f"synthetic LLaMA, hidden {SHAPES['small'][0]}, intermediate {SHAPES['small'][1]}, bf16 weights, "
        f"calibration {args.nsamples} x {args.seqlen}, {args.dtype} compute"
    )
    for method in ("wanda", "besa"):
        peaks = {}
        for blocks in (8, 32):
            folder = checkpoint("small", blocks)
            size = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**30
            result = prune_in_child(folder, method, args.nsamples, args.seqlen, args.dtype, args.device)
            peaks[blocks] = result["peak_rss_gb"]
            print(
                f"{method:6s} {blocks:2d} blocks ({size:.2f} GB on disk): peak RSS {result['peak_rss_gb']:.2f} GB, "
                f"wall {result['wall_s']:.0f} s"
                + (f", peak GPU {result['peak_gpu_gb']:.2f} GB" if result["peak_gpu_gb"] else "")
            )
        print(f"{method:6s} 32-block peak / 8-block peak = {peaks[32] / peaks[8]:.2f}")


def seven_b(args) -> None:
    folder = checkpoint("7b", 32)
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**30
    result = prune_in_child(folder, "wanda", args.nsamples, args.seqlen, args.dtype, args.device)
    print(
        f"LLaMA-2-7B shape (hidden 4096, intermediate 11008, 32 blocks, {size:.1f} GB bf16 on disk), Wanda, "
        f"calibration {args.nsamples} x {args.seqlen}, {args.dtype} compute: peak RSS {result['peak_rss_gb']:.2f} GB, "
        f"wall {result['wall_s'] / 60:.1f} min"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["depth", "7b"])
    parser.add_argument("--nsamples", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(f"peak RSS of this driver so far: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB")
    {"depth": depth, "7b": seven_b}[args.what](args)


if __name__ == "__main__":
    main()
