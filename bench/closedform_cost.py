"""The closed-form part on one real block: seconds and least-squares error of each stage, per linear.

Block B of the demo model on C4 calibration inputs (the dense model's own activations), Wanda's
masks at 50% as BESA's starting point: for every linear, the OBS sweep choosing within the masks'
counts, the exact solve, and the swap rounds one at a time, each with its time and the objective
(w - w0) (H + lambda I) (w - w0)^T summed over rows, relative to the masked dense weights'. The
objective is measured on the calibration Gram itself: no test text is read. Timings, not a test.

    python bench/closedform_cost.py --data-dir path/to/data [--block 3] [--nsamples 128] [--seqlen 512]
"""

from __future__ import annotations

import argparse
import time

import torch

from besa_pl.closedform.damping import damped_gram
from besa_pl.closedform.mask_swaps import swap_refine
from besa_pl.closedform.masked_solve import masked_least_squares
from besa_pl.closedform.obs import CountSelect, obs_sweep
from besa_pl.data.calibration import calibration_tokens
from besa_pl.models.activations import capture_block_inputs, run_block
from besa_pl.models.loading import decoder_blocks, load_model, prunable_linears
from besa_pl.oneshot.baselines import keep_mask_from_scores
from besa_pl.oneshot.importance import reference_pass, wanda_scores


def objective(w, w0, h):
    d = w - w0
    return float(((d @ h) * d).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--block", type=int, default=3)
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--percdamp", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()

    model, tokenizer = load_model("demo", "float32")
    tokens, _ = calibration_tokens("c4", tokenizer, args.nsamples, args.seqlen, 0, args.data_dir)
    cache = capture_block_inputs(model, tokens)
    blocks = decoder_blocks(model)
    for index in range(args.block):
        run_block(blocks[index], cache.inputs, cache.block_kwargs[index], "cpu", out=cache.inputs)
    block = blocks[args.block]
    _, stats = reference_pass(block, cache.inputs, cache.block_kwargs[args.block], "cpu", gram=True)
    print(f"threads {torch.get_num_threads()}; demo block {args.block}; {args.nsamples} x {args.seqlen} C4")
    print("| linear | shape | sweep s | solve s | swaps s (rounds) | masked | sweep | solve | swaps after round 1..n |")
    print("|---|---|---|---|---|---|---|---|---|")
    totals = [0.0, 0.0, 0.0]
    for name, linear in prunable_linears(block).items():
        w0 = linear.weight.detach().float().clone()
        hessian = stats[name].hessian
        keep = keep_mask_from_scores(wanda_scores(w0, stats[name].col_sq), 0.5, "row")
        h, _ = damped_gram(hessian, args.percdamp)
        base = objective(w0 * keep, w0, h)
        start = time.perf_counter()
        w, keep, _ = obs_sweep(w0, hessian, select=CountSelect(keep), percdamp=args.percdamp)
        sweep_s = time.perf_counter() - start
        swept = objective(w, w0, h)
        start = time.perf_counter()
        w = masked_least_squares(w, w0, hessian, keep, args.percdamp)
        solve_s = time.perf_counter() - start
        solved = objective(w, w0, h)
        solved_w, solved_keep = w.clone(), keep.clone()
        after, swaps_s = [], 0.0
        for _ in range(args.rounds):  # one round per call: the error after each
            start = time.perf_counter()
            w, keep = swap_refine(w, w0, hessian, keep, 1, args.percdamp)
            swaps_s += time.perf_counter() - start
            after.append(objective(w, w0, h) / base)
        start = time.perf_counter()
        stopped, _ = swap_refine(solved_w, w0, hessian, solved_keep, args.rounds, args.percdamp)
        early_s = time.perf_counter() - start
        after.append(f"(stopping at the default tolerance: {objective(stopped, w0, h) / base:.4f} in {early_s:.2f} s)")
        totals = [totals[0] + sweep_s, totals[1] + solve_s, totals[2] + swaps_s]
        print(
            f"| {name} | {tuple(w0.shape)} | {sweep_s:.2f} | {solve_s:.2f} | {swaps_s:.2f} ({args.rounds}) | 1 | "
            f"{swept / base:.4f} | {solved / base:.4f} | {' '.join(a if isinstance(a, str) else f'{a:.4f}' for a in after)} |"
        )
    print(f"| all | | {totals[0]:.2f} | {totals[1]:.2f} | {totals[2]:.2f} | | | | |")


if __name__ == "__main__":
    main()
