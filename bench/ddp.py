"""Time per block and activation memory per rank with 1 and with 2 DDP ranks (prints figures).

    python bench/ddp.py --data-dir path/to/data [--method besa] [--nsamples 32 --seqlen 256] [--accelerator cpu]

Each run is `besa-pl fit` in its own process (Lightning's DDP launcher starts the second rank);
the time per block is the mean of the blocks' times that BlockwiseLoop prints, and the activation
memory per rank is what the loop reports holding (inputs and targets of its share of the samples).
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
    start = time.perf_counter()
    done = subprocess.run(
        command, capture_output=True, text=True, cwd=str(REPO), env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    seconds = [float(s) for s in re.findall(r"realised \S+\s+([\d.]+)s", done.stderr)]
    results = json.loads((root / "results.json").read_text())
    return {
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
    args = parser.parse_args()
    print(
        f"{args.method} on {args.model}, {args.nsamples} x {args.seqlen} calibration tokens, {args.accelerator}, "
        f"{os.cpu_count()} CPU cores"
    )
    for ranks in (1, 2):
        r = run(ranks, args)
        print(
            f"{ranks} rank(s): {r['block_s']:.1f} s per block, activations {r['activation_gb_per_rank']:.3f} GB per rank, "
            f"whole run {r['wall_s']:.0f} s"
        )


if __name__ == "__main__":
    main()
