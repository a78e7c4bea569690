"""Does fidelity to the dense model (no data needed) rank the methods as WikiText2 does?

Reads the stored runs of one calibration and window count that carry both a FidelityEval result
and WikiText2 (`python bench/quality.py ... --fidelity 8 256`), prints their table and the rank
agreement (Spearman's rho and Kendall's tau) of KL, top-1 agreement and the self-text perplexity
with WikiText2 perplexity, and writes it to bench/results/fidelity-<N>x<T>-w<windows>.md.

    python bench/fidelity_ranks.py [--calibration 64x256] [--windows 16] [--sparsity 0.5]
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = ranks(a), ranks(b)
    mean = (len(a) + 1) / 2
    cov = sum((x - mean) * (y - mean) for x, y in zip(ra, rb))
    var_a = sum((x - mean) ** 2 for x in ra)
    var_b = sum((y - mean) ** 2 for y in rb)
    return cov / (var_a * var_b) ** 0.5


def kendall(a: list[float], b: list[float]) -> float:
    """Kendall's tau-a: (concordant - discordant) pairs over all pairs."""
    pairs = list(itertools.combinations(range(len(a)), 2))
    score = sum((a[i] - a[j]) * (b[i] - b[j]) > 0 for i, j in pairs) - sum(
        (a[i] - a[j]) * (b[i] - b[j]) < 0 for i, j in pairs
    )
    return score / len(pairs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="demo")
    parser.add_argument("--calibration", default="64x256")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--sparsity", type=float, default=0.5)
    args = parser.parse_args()

    pattern = f"*-s{args.sparsity}-{args.calibration}-w{args.windows}.json"
    runs = []
    for path in sorted((RESULTS / "runs" / args.model).glob(pattern)):
        stored = json.loads(path.read_text())
        if "fidelity" in stored and "wikitext2" in stored.get("perplexity", {}):
            runs.append(stored)
    if len(runs) < 3:
        raise SystemExit(f"{len(runs)} stored runs match {pattern} with fidelity and WikiText2; need 3 or more")
    commits = sorted({r["commit"] for r in runs})
    environments = {json.dumps(r.get("environment"), sort_keys=True) for r in runs}
    if len(commits) > 1 or len(environments) > 1:
        raise SystemExit(f"the runs come from {len(commits)} commits / {len(environments)} environments; rerun them")
    runs.sort(key=lambda r: r["perplexity"]["wikitext2"])
    wikitext = [r["perplexity"]["wikitext2"] for r in runs]
    measures = {
        "KL, dense to pruned": [r["fidelity"]["kl"] for r in runs],
        "1 - top-1 agreement": [1 - r["fidelity"]["top1_agreement"] for r in runs],
        "self-text perplexity": [r["fidelity"]["perplexity_pruned"] for r in runs],
    }
    first = runs[0]
    lines = [
        f"# Fidelity against WikiText2: {args.model} at {args.sparsity:.0%}",
        "",
        f"Commit {commits[0]}; calibration {first['calibration']}; WikiText2 first {args.windows} windows of 2048;"
        f" fidelity on {first['fidelity']['texts']} x {first['fidelity']['seqlen']} tokens the dense model wrote"
        f" (seed {first['fidelity']['seed']}). Environment: {first.get('environment')}.",
        "",
        "| run | WikiText2 | KL (nats) | top-1 agreement | self-text ppl (dense "
        f"{first['fidelity']['perplexity_dense']:.3f}) |",
        "|---|---|---|---|---|",
    ]
    for r in runs:
        f = r["fidelity"]
        lines.append(
            f"| {r['run']} | {r['perplexity']['wikitext2']:.3f} | {f['kl']:.4f} | {100 * f['top1_agreement']:.2f}% |"
            f" {f['perplexity_pruned']:.3f} |"
        )
    lines += [
        "",
        f"Rank agreement with WikiText2 over {len(runs)} runs:",
        "",
        "| measure | Spearman rho | Kendall tau |",
    ]
    lines.append("|---|---|---|")
    for name, values in measures.items():
        lines.append(f"| {name} | {spearman(values, wikitext):.3f} | {kendall(values, wikitext):.3f} |")
    lines += [
        "",
        "Command: `python bench/fidelity_ranks.py " + f"--calibration {args.calibration} --windows {args.windows}`",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    out = RESULTS / f"fidelity-{args.calibration}-w{args.windows}.md"
    out.write_text(text)


if __name__ == "__main__":
    main()
