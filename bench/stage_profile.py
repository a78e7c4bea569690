"""Where a pruning run spends its time: seconds per stage, per block, for one method.

Runs the real Trainer and BlockwiseLoop in this process (no fit-end evaluations) with a timer
around each stage's function, then prints a table. Nested stages (the sweep, the solve and the
swaps inside the reconstruction) are listed under their parent, and the parent's remainder
(Grams, forwards through the block) as "other". Timings, not a test: run it alone on a quiet
machine, before and after a change, and compare only tables from the same machine.

    python bench/stage_profile.py --data-dir path/to/data --dataset c4 --nsamples 128 --seqlen 512 --method besa
    python bench/stage_profile.py --method sparsegpt --reconstruct none     # SparseGPT as published
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from besa_pl import BESAPruner, CalibrationDataModule, make_trainer
from besa_pl.besa.block import BESABlock
from besa_pl.besa.pruner import BESAPruner as PrunerClass
from besa_pl.closedform import reconstruction
from besa_pl.eval.perplexity import PerplexityEval
from besa_pl.eval.report import cpu_model
from besa_pl.loop import blockwise_loop
from besa_pl.models.source import ModelSource
from besa_pl.models.weights import ShardWriter

# (label, parent label or None, owner object, attribute): the functions timed, where the loop calls them.
STAGES = [
    ("capture block 0's inputs", None, blockwise_loop, "capture_block_inputs"),
    ("load block weights", None, ModelSource, "load_block"),
    ("reference pass + statistics", None, blockwise_loop, "reference_pass"),
    ("importance ranks", None, blockwise_loop, "rank_linears"),
    ("BESA training steps", None, PrunerClass, "training_step"),
    ("burn in the masks", None, BESABlock, "finalize"),
    ("one-shot prune (Wanda / SparseGPT)", None, blockwise_loop, "prune_linear"),
    ("reconstruction", None, blockwise_loop, "reconstruct_block"),
    ("  OBS sweep", "reconstruction", reconstruction, "obs_sweep"),
    ("  exact solve", "reconstruction", reconstruction, "masked_least_squares"),
    ("  swaps", "reconstruction", reconstruction, "swap_refine"),
    ("forward for the next block's inputs", None, blockwise_loop, "run_block"),
    ("write the block's shard", None, ShardWriter, "write"),
    ("digest of the shard", None, blockwise_loop, "file_digest"),
]


def timed(seconds: dict[str, float], calls: dict[str, int], label: str, function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            seconds[label] += time.perf_counter() - start
            calls[label] += 1

    return wrapper


def environment() -> dict:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
    ).stdout.strip()
    return {"commit": commit, "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_model()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--method", default="besa")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--reconstruct", default="auto", help="model.reconstruct (auto: the method's default)")
    parser.add_argument("--dataset", default="c4")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument(
        "--ppl-windows",
        type=int,
        default=0,
        help="after the timed pruning, WikiText2 perplexity on the first N windows of 2048 (needs the data folder)",
    )
    args = parser.parse_args()

    seconds: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for label, _parent, owner, name in STAGES:
        setattr(owner, name, timed(seconds, calls, label, getattr(owner, name)))

    # The wall time ends when the pruned folder is written, before any evaluation.
    ended: list[float] = []
    finish = blockwise_loop.BlockwiseLoop.finish

    def finish_and_stop_clock(self, trainer, pruner):
        finish(self, trainer, pruner)
        ended.append(time.perf_counter())

    blockwise_loop.BlockwiseLoop.finish = finish_and_stop_clock

    pruner = BESAPruner(args.model, method=args.method, sparsity=args.sparsity, reconstruct=args.reconstruct)
    data = CalibrationDataModule(args.dataset, args.nsamples, args.seqlen, data_dir=args.data_dir)
    callbacks = [PerplexityEval(["wikitext2"], max_windows=args.ppl_windows)] if args.ppl_windows else []
    with tempfile.TemporaryDirectory() as root:
        trainer = make_trainer(
            root,
            callbacks,
            accelerator="cpu" if not torch.cuda.is_available() else "auto",
            logger=False,
            enable_progress_bar=False,
        )
        start = time.perf_counter()
        trainer.fit(pruner, datamodule=data)
        wall = ended[0] - start
    ppl = pruner.results.get("perplexity", {}).get("wikitext2")
    blocks = pruner.num_blocks
    print(
        f"\n{pruner.settings.variant()}, {args.model}, {args.nsamples} x {args.seqlen} {args.dataset}: "
        f"{wall:.1f} s wall, {blocks} blocks, {json.dumps(environment())}"
        + (f"; WikiText2 {ppl:.3f} on the first {args.ppl_windows} windows of 2048" if ppl is not None else "")
        + "\n"
    )
    print("| stage | calls | s total | s per block | share of wall |\n|---|---|---|---|---|")
    for label, _parent, _owner, _name in STAGES:
        if calls[label]:
            print(
                f"| {label} | {calls[label]} | {seconds[label]:.1f} | {seconds[label] / blocks:.2f} | "
                f"{100 * seconds[label] / wall:.0f}% |"
            )
        if label == "  swaps" and calls["reconstruction"]:
            rest = seconds["reconstruction"] - sum(
                seconds[f"  {part}"] for part in ("OBS sweep", "exact solve", "swaps")
            )
            print(f"|   other (Grams, forwards) | | {rest:.1f} | {rest / blocks:.2f} | {100 * rest / wall:.0f}% |")
    top = sum(seconds[label] for label, parent, _o, _n in STAGES if parent is None)
    print(
        f"| everything else (Lightning, data) | | {wall - top:.1f} | {(wall - top) / blocks:.2f} | "
        f"{100 * (wall - top) / wall:.0f}% |"
    )
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "wall": wall,
                    "wikitext2": ppl,
                    "blocks": blocks,
                    "seconds": seconds,
                    "calls": calls,
                    "variant": pruner.settings.variant(),
                    "environment": environment(),
                    "args": {k: str(v) for k, v in vars(args).items()},
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
