"""Time of writing self-calibration text (`--data.dataset self`) per generation batch size.

For each batch size: the wall time of `generate_samples`, the tokens kept, and the tokens the
model computed (every forward's input tokens; with transformers' `generate` a row that meets EOS
early keeps its place in the batch until the longest row stops, and those steps are thrown away).
Run it from another checkout to time another version of the writer.

    python bench/self_calibration_speed.py [--nsamples 64] [--seqlen 256] [--batch-sizes 16 32 64]
"""

from __future__ import annotations

import argparse
import time

import torch

from besa_pl.data.self_calibration import SelfRecipe, generate_samples
from besa_pl.eval.report import cpu_model
from besa_pl.models.loading import load_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pretrained", default="demo")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model, tokenizer = load_model(args.pretrained)
    computed = [0]

    def count(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        computed[0] += ids.numel()

    model.register_forward_pre_hook(count, with_kwargs=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_model()}")
    print(f"{args.nsamples} x {args.seqlen} tokens, seed {args.seed}")
    print("| batch | seconds | tokens/s kept | tokens computed | share wasted |")
    print("|---|---|---|---|---|")
    for batch_size in args.batch_sizes:
        computed[0] = 0
        torch.manual_seed(args.seed)
        start = time.perf_counter()
        samples = generate_samples(
            model, tokenizer, args.nsamples, args.seqlen, SelfRecipe(batch_size=batch_size), "cpu"
        )
        seconds = time.perf_counter() - start
        kept = samples.numel()
        print(
            f"| {batch_size} | {seconds:.1f} | {kept / seconds:.0f} | {computed[0]} | {1 - kept / computed[0]:.1%} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
