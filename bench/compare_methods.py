"""Prune the demo model with several methods on the same calibration and print one table.

Each run goes through the same Trainer, BlockwiseLoop and evaluation callbacks as `besa-pl fit`.

    python bench/compare_methods.py --out runs/compare --nsamples 128 --seqlen 2048 \
        --runs dense magnitude wanda sparsegpt besa besa-q4 wanda-q4 sparsegpt-2:4 [--zero-shot-limit 500]

A run name is a method, optionally with -q4 (joint 4-bit quantization, group 64) or -N:M.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from besa_pl import BESAPruner, CalibrationDataModule
from besa_pl.callbacks import HardwareSimulation, PerplexityEval, ZeroShotEval
from besa_pl.loop.trainer import make_trainer
from besa_pl.quant.quantizer import QuantConfig


def run(name: str, args) -> dict:
    method, _, suffix = name.partition("-")
    quant = QuantConfig(bits=4, group_size=64) if suffix == "q4" else QuantConfig()
    structure = suffix if ":" in suffix else None
    pruner = BESAPruner(
        pretrained="demo", method=method, sparsity=0.5, structure=structure, quant=quant, dtype=args.dtype
    )
    data = CalibrationDataModule(
        dataset="c4", nsamples=args.nsamples, seqlen=args.seqlen, seed=0, data_dir=args.data_dir
    )
    callbacks = [
        PerplexityEval(datasets=args.ppl, seqlen=2048, batch_size=args.eval_batch, max_windows=args.max_windows),
        HardwareSimulation(latency_seqlen=2048),
    ]
    if args.zero_shot_limit != 0:
        callbacks.append(ZeroShotEval(limit=args.zero_shot_limit or None, batch_size=64))
    root = Path(args.out) / name.replace(":", "_")
    trainer = make_trainer(
        root,
        callbacks,
        accelerator=args.accelerator,
        devices=1,
        precision=args.precision,
        logger=False,
        enable_progress_bar=False,
    )
    start = time.perf_counter()
    trainer.fit(pruner, datamodule=data)
    results = dict(pruner.results)
    results["wall_s"] = time.perf_counter() - start
    results["calibration"] = f"{args.nsamples} x {args.seqlen} tokens, {data.source}"
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/compare")
    parser.add_argument("--runs", nargs="+", default=["dense", "magnitude", "wanda", "sparsegpt", "besa"])
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--ppl", nargs="+", default=["wikitext2"])
    parser.add_argument("--max-windows", type=int, default=None)
    parser.add_argument("--eval-batch", type=int, default=8)
    parser.add_argument("--zero-shot-limit", type=int, default=0, help="items per task; 0 = skip; -1 = all")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--budget-s", type=float, default=float("inf"), help="start no new run after this")
    parser.add_argument("--json", default=None, help="also write all results here")
    args = parser.parse_args()
    if args.zero_shot_limit == -1:
        args.zero_shot_limit = None

    started = time.perf_counter()
    table = {}
    for name in args.runs:
        if time.perf_counter() - started > args.budget_s:
            print(f"skipped {name}: time budget spent")
            continue
        try:
            table[name] = run(name, args)
        except Exception as error:  # one failed run should not lose the others' numbers
            table[name] = {"error": f"{type(error).__name__}: {error}"}
        print(json.dumps({name: table[name]}, default=float))
        if args.json:
            Path(args.json).write_text(json.dumps(table, indent=2, default=float))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    print(
        f"\n{'run':<16}{'sparsity':>10}"
        + "".join(f"{'ppl ' + d:>14}" for d in args.ppl)
        + f"{'0-shot':>9}{'wall s':>9}"
    )
    for name, r in table.items():
        if "error" in r:
            print(f"{name:<16} {r['error']}")
            continue
        ppl = "".join(f"{r.get('perplexity', {}).get(d, float('nan')):>14.3f}" for d in args.ppl)
        zs = r.get("zero_shot", {}).get("mean_acc")
        print(
            f"{name:<16}{r['realised_sparsity']:>10.4f}{ppl}{(100 * zs if zs else float('nan')):>9.2f}{r['wall_s']:>9.0f}"
        )


if __name__ == "__main__":
    main()
