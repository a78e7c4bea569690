"""Whether two models' zero-shot accuracies differ by more than noise: a paired comparison.

Both models answer the same items, so the difference of their accuracies has a much smaller
standard error than either accuracy alone: per task, d_i = a_i - b_i over the items the two runs
share, difference = mean(d), standard error = std(d) / sqrt(n). The five-task mean's difference is
the mean of the tasks' differences, its standard error sqrt(sum se_t^2) / T (tasks are independent).
`acc_norm` counts acc where a task has none, as `mean_acc_norm` does.

    python -m besa_pl.eval.zero_shot_compare runs/a/results.json runs/b/results.json [--metric acc_norm]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from besa_pl.errors import BesaError


def paired_difference(a: str, b: str) -> tuple[float, float, int]:
    """(mean of a - b, its paired standard error, items) for two 0/1 strings over the same items."""
    if len(a) != len(b) or not a:
        raise BesaError(f"zero-shot items differ in number ({len(a)} vs {len(b)}): compare runs with the same limit")
    d = [int(x) - int(y) for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    var = sum((v - mean) ** 2 for v in d) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n), n


def compare(a: dict, b: dict, metric: str = "acc") -> dict:
    """Per-task and mean paired differences (a - b) from two results.json `zero_shot` entries."""
    items_a, items_b = a.get("items") or {}, b.get("items") or {}
    tasks = [task for task in items_a if task in items_b]
    if not tasks:
        raise BesaError(
            "no zero-shot task has per-item scores in both runs; rerun ZeroShotEval (older results.json files lack them)"
        )
    rows = {}
    for task in tasks:
        key_a = metric if metric in items_a[task] else "acc"
        key_b = metric if metric in items_b[task] else "acc"
        diff, se, n = paired_difference(items_a[task][key_a], items_b[task][key_b])
        rows[task] = {"difference": diff, "se": se, "items": n}
    mean = sum(row["difference"] for row in rows.values()) / len(rows)
    se = math.sqrt(sum(row["se"] ** 2 for row in rows.values())) / len(rows)
    return {"metric": metric, "tasks": rows, "mean": {"difference": mean, "se": se}}


def zero_shot_of(path: str) -> dict:
    data = json.loads(Path(path).read_text())
    if "zero_shot" not in data:
        raise BesaError(f"{path}: no zero_shot results; run with the ZeroShotEval callback")
    return data["zero_shot"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", help="results.json of model A")
    parser.add_argument("b", help="results.json of model B")
    parser.add_argument("--metric", choices=("acc", "acc_norm"), default="acc")
    args = parser.parse_args(argv)
    try:
        result = compare(zero_shot_of(args.a), zero_shot_of(args.b), args.metric)
    except BesaError as error:
        sys.exit(f"error: {error}")
    print(f"{args.metric}, A - B in points (paired standard error); |difference| < 2 se is within noise")
    for task, row in result["tasks"].items():
        print(f"  {task:<14} {100 * row['difference']:+6.2f} ({100 * row['se']:.2f})  {row['items']} items")
    mean = result["mean"]
    print(f"  {'mean':<14} {100 * mean['difference']:+6.2f} ({100 * mean['se']:.2f})")


if __name__ == "__main__":
    main()
