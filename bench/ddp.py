"""Time per block, activation memory per rank, and the model itself with 1 and with 2 DDP ranks.

    python bench/ddp.py --data-dir path/to/data [--method besa] [--nsamples 32 --seqlen 256] [--accelerator cpu]

Each run is `besa-pl fit` in its own process (Lightning's DDP launcher starts the second rank);
the time per block is the mean of the blocks' times that BlockwiseLoop prints, and the activation
memory per rank is what the loop reports holding (inputs and targets of its share of the samples).
The one-process run takes a micro-batch of 2 (what 2 ranks with one sample each amount to), and
the last line compares the two pruned models: mask entries and weights that differ. Every process
runs `--threads` threads (1 by default): a CPU matmul's last bits can depend on the thread count,
as GPUs of one model give the same bits, so the ranks must compute each sample with the kernels
the one process uses for the models to match.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from besa_pl.models.weights import WeightStore

REPO = Path(__file__).resolve().parents[1]


def run(ranks: int, args) -> dict:
    root = Path(tempfile.mkdtemp(prefix=f"besa-ddp-{ranks}-"))
    command = [
        sys.executable,
        "-m",
        "besa_pl.cli",
        "fit",
        "--model.pretrained",
        args.model,
        "--model.method",
        args.method,
        "--data.dataset",
        "c4",
        "--data.data_dir",
        args.data_dir,
        "--data.nsamples",
        str(args.nsamples),
        "--data.seqlen",
        str(args.seqlen),
        "--trainer.default_root_dir",
        str(root),
        "--trainer.accelerator",
        args.accelerator,
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.logger",
        "false",
    ]
    if ranks > 1:
        command += ["--trainer.devices", str(ranks), "--trainer.strategy", "ddp"]
    else:
        command += ["--data.batch_size", "2"]
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(command, capture_output=True, text=True, cwd=str(REPO), env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    seconds = [float(s) for s in re.findall(r"realised \S+\s+([\d.]+)s", done.stderr)]
    results = json.loads((root / "results.json").read_text())
    return {
        "root": root,
        "ranks": ranks,
        "wall_s": wall,
        "block_s": sum(seconds) / len(seconds),
        "activation_gb_per_rank": results["activation_bytes_per_rank"] / 2**30,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--method", default="besa")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="threads of every process (OMP_NUM_THREADS)")
    args = parser.parse_args()
    print(
        f"{args.method} on {args.model}, {args.nsamples} x {args.seqlen} calibration tokens, {args.accelerator}, "
        f"{os.cpu_count()} CPU cores, {args.threads} thread(s) per process"
    )
    roots = []
    for ranks in (1, 2):
        r = run(ranks, args)
        roots.append(r["root"])
        print(
            f"{ranks} rank(s): {r['block_s']:.1f} s per block, activations {r['activation_gb_per_rank']:.3f} GB per rank, "
            f"whole run {r['wall_s']:.0f} s"
        )
    one, two = (WeightStore(root / "pruned") for root in roots)
    names = [name for name in one.files if name.endswith("proj.weight")]
    entries = masks_differ = weights_differ = 0
    for name in names:
        a, b = one.get(name), two.get(name)
        entries += a.numel()
        masks_differ += int(((a != 0) != (b != 0)).sum())
        weights_differ += int((a != b).sum())
    print(
        f"1 vs 2 ranks: {masks_differ:,} of {entries:,} mask entries differ ({masks_differ / entries:.2e}), "
        f"{weights_differ:,} weights differ"
    )


if __name__ == "__main__":
    main()
