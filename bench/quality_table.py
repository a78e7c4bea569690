"""bench/results/quality.md and quality.png from the stored runs of bench/quality.py."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

ORDER = ["dense", "magnitude", "wanda", "sparsegpt", "besa-paper", "besa-paper-exact", "wanda-obs", "besa"]
TASKS = ["piqa", "boolq", "winogrande", "arc_easy", "arc_challenge"]


def load_runs(results: Path) -> list[dict]:
    runs = []
    for path in sorted((results / "runs").glob("*/*.json")):
        run = json.loads(path.read_text())
        run["file"] = path.name
        run["calibration_key"] = re.search(r"-(\d+x\d+)(-w\d+)?$", path.stem).group(1)
        runs.append(run)
    return runs


def _ppl(run: dict, dataset: str) -> str:
    value = run.get("perplexity", {}).get(dataset)
    return f"{value:.2f}" if value is not None else "-"


def _windows(run: dict, dataset: str) -> int | None:
    return run.get("perplexity_details", {}).get(dataset, {}).get("windows")


def write_table(results: Path, calibration: str = "128x512") -> None:
    runs = [r for r in load_runs(results) if r["calibration_key"] == calibration and r["run"] in ORDER]
    lines = ["# Quality benchmark", ""]
    commands = sorted({r.get("command", "") for r in runs if r.get("command")})
    for model in sorted({r["model"] for r in runs}):
        model_runs = [r for r in runs if r["model"] == model]
        lines += [f"## {model}", ""]
        for sparsity in sorted({r["sparsity"] for r in model_runs if r["run"] != "dense"}):
            rows = [r for r in model_runs if r["sparsity"] == sparsity]
            windows = {_windows(r, "wikitext2") for r in rows} - {None}
            # the dense reference on the same windows as the pruned rows
            dense = next((r for r in model_runs if r["run"] == "dense" and _windows(r, "wikitext2") in windows), None)
            rows = rows + ([dense] if dense else [])
            rows.sort(key=lambda r: ORDER.index(r["run"]))
            sparsegpt = next((r for r in rows if r["run"] == "sparsegpt"), None)
            lines += [f"### sparsity {sparsity}: WikiText2 perplexity at 2048 over {', '.join(map(str, sorted(windows)))} "
                      "windows", "",
                      "| method | realised sparsity | WikiText2 | distance to dense / SparseGPT's | " +
                      " | ".join(TASKS) + " | mean acc | wall s | commit |",
                      "|---" * (7 + len(TASKS)) + "|"]
            for run in rows:
                ratio = "-"
                if dense and sparsegpt and run["run"] != "dense":
                    d = dense["perplexity"]["wikitext2"]
                    ratio = f"{(run['perplexity']['wikitext2'] - d) / (sparsegpt['perplexity']['wikitext2'] - d):.3f}"
                zero = run.get("zero_shot", {}) if run.get("zero_shot", {}).get("limit") is None else {}
                accs = [f"{100 * zero['tasks'][t]['acc']:.2f}" if t in zero.get("tasks", {}) else "-" for t in TASKS]
                mean = f"{100 * zero['mean_acc']:.2f}" if zero.get("mean_acc") is not None else "-"
                lines.append(f"| {run['run']} | {run['realised_sparsity']:.4f} | {_ppl(run, 'wikitext2')} | {ratio} | "
                             + " | ".join(accs) + f" | {mean} | {run['wall_s']:.0f} | {run.get('commit', '?')} |")
            lines.append("")
    lines += ["Calibration: 128 x 512 tokens of the local C4 train excerpt (`c4/c4_sample.jsonl`, the first 1000",
              "documents of shard 00000), seed 0, the SparseGPT/Wanda recipe. Zero-shot: full local task files",
              "(hellaswag has none), acc. Commands:", ""] + [f"    {c}" for c in commands] + [""]
    (results / "quality.md").write_text("\n".join(lines))
    plot(runs, results / "quality.png")


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in runs})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for axis, model in zip(axes[0], models):
        series = defaultdict(list)
        for run in runs:
            if run["model"] == model and run["run"] != "dense" and "wikitext2" in run.get("perplexity", {}):
                series[run["run"]].append((run["sparsity"], run["perplexity"]["wikitext2"]))
        for name in [n for n in ORDER if n in series]:
            points = sorted(series[name])
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
        dense = next((r for r in runs if r["model"] == model and r["run"] == "dense"), None)
        if dense:
            axis.axhline(dense["perplexity"]["wikitext2"], color="gray", linestyle="--", label="dense")
        axis.set_yscale("log")
        axis.set_xlabel("sparsity")
        axis.set_ylabel("WikiText2 perplexity at 2048 (windows: quality.md)")
        axis.set_title(model)
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
