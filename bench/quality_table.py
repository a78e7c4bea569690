"""bench/results/quality.md and quality.png from the stored runs of bench/quality.py."""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path

from besa_pl.eval.zero_shot import task_means

ORDER = [
    "dense",
    "magnitude",
    "wanda",
    "sparsegpt",
    "besa-paper",
    "besa-paper-exact",
    "wanda-obs",
    "besa-sweep",
    "besa-exact",
    "besa-d0.01",
    "besa-d0.1",
    "besa",
]
# One colour per method in every panel (matplotlib's cycle without its grey, the dense line's); the default in black.
COLOURS = {
    "magnitude": "C0",
    "wanda": "C1",
    "sparsegpt": "C2",
    "besa-paper": "C3",
    "besa-paper-exact": "C9",
    "wanda-obs": "C4",
    "besa-sweep": "C5",
    "besa-exact": "C6",
    "besa-d0.01": "C8",
    "besa-d0.1": "peru",
    "besa": "black",
}
TASKS = ["piqa", "boolq", "winogrande", "arc_easy", "arc_challenge"]


def load_runs(results: Path) -> list[dict]:
    runs = []
    for path in sorted((results / "runs").glob("*/*.json")):
        run = json.loads(path.read_text())
        run["file"] = path.name
        run["calibration_key"] = re.search(r"-(\d+x\d+)(-w\d+)?$", path.stem).group(1)
        runs.append(run)
    return runs


def _ppl(run: dict, dataset: str, windows: int | None = None) -> float | None:
    """The run's perplexity, or over its first `windows` windows when it stored each window's loss."""
    details = run.get("perplexity_details", {}).get(dataset, {})
    losses = details.get("window_loss")
    if windows is not None and windows != details.get("windows"):
        if not losses or len(losses) < windows:
            return None
        return math.exp(sum(losses[:windows]) / windows)
    return run.get("perplexity", {}).get(dataset)


def _fmt(value: float | None) -> str:
    return f"{value:.2f}" if value is not None else "-"


def _windows(run: dict, dataset: str) -> int | None:
    return run.get("perplexity_details", {}).get(dataset, {}).get("windows")


def _dense_on(runs: list[dict], windows: int) -> dict | None:
    """A dense run that has the first `windows` windows (a prefix of a longer run serves)."""
    return next((r for r in runs if r["run"] == "dense" and _ppl(r, "wikitext2", windows) is not None), None)


def write_table(results: Path, calibration: str = "128x512") -> None:
    # runs measured on WikiText2 with this calibration; the dense model needs none, so any dense run serves
    runs = [
        r
        for r in load_runs(results)
        if r.get("run") in ORDER
        and "wikitext2" in r.get("perplexity", {})
        and (r["calibration_key"] == calibration or r["run"] == "dense")
    ]
    lines = ["# Quality benchmark", ""]
    shown: list[dict] = []  # the runs in the tables, whose commands the caption lists
    for model in sorted({r["model"] for r in runs if r["run"] != "dense"}):  # models with pruned runs
        model_runs = [r for r in runs if r["model"] == model]
        lines += [f"## {model}", ""]
        for sparsity in sorted({r["sparsity"] for r in model_runs if r["run"] != "dense"}):
            rows = [r for r in model_runs if r["sparsity"] == sparsity and r["run"] != "dense"]
            count = min(w for w in (_windows(r, "wikitext2") for r in rows) if w is not None)
            # the dense reference on the same windows as the pruned rows (a prefix of a longer run)
            dense = _dense_on(model_runs, count)
            rows = rows + ([dense] if dense else [])
            rows.sort(key=lambda r: ORDER.index(r["run"]))
            sparsegpt = next((r for r in rows if r["run"] == "sparsegpt"), None)
            lines += [
                f"### sparsity {sparsity}: WikiText2 perplexity at 2048 over the first {count} windows",
                "",
                "| method | realised sparsity | WikiText2 | distance to dense / SparseGPT's | first 40 windows | "
                + " | ".join(TASKS)
                + " | mean acc | mean acc_norm | commit |",
                "|---" * (8 + len(TASKS)) + "|",
            ]
            shown += rows
            for run in rows:
                ppl = _ppl(run, "wikitext2", count)
                ratio = "-"
                if dense and sparsegpt and run["run"] != "dense" and ppl is not None:
                    d = _ppl(dense, "wikitext2", count)
                    ratio = f"{(ppl - d) / (_ppl(sparsegpt, 'wikitext2', count) - d):.3f}"
                zero = run.get("zero_shot", {}) if run.get("zero_shot", {}).get("limit") is None else {}
                accs = [f"{100 * zero['tasks'][t]['acc']:.2f}" if t in zero.get("tasks", {}) else "-" for t in TASKS]
                # runs stored before mean_acc_norm existed: recomputed from their per-task scores
                means = task_means(zero.get("tasks", {})) if zero else {}
                mean = " | ".join(
                    f"{100 * means[m]:.2f}" if means.get(m) is not None else "-" for m in ("mean_acc", "mean_acc_norm")
                )
                lines.append(
                    f"| {run['run']} | {run['realised_sparsity']:.4f} | {_fmt(ppl)} | {ratio} | "
                    f"{_fmt(_ppl(run, 'wikitext2', 40))} | "
                    + " | ".join(accs)
                    + f" | {mean} | {run.get('commit', '?')} |"
                )
            lines.append("")
    # the data folder is the user's own path: shown as DATA
    commands = sorted({re.sub(r"--data-dir \S+", "--data-dir DATA", r["command"]) for r in shown if r.get("command")})
    samples, tokens = calibration.split("x")
    lines += (
        [
            f"Calibration: {samples} x {tokens} tokens of the local C4 train excerpt (`c4/c4_sample.jsonl`, the first 1000",
            "documents of shard 00000), seed 0, the SparseGPT/Wanda recipe. Zero-shot: full local task files",
            "(hellaswag has none), acc; mean acc_norm averages acc_norm where a task has it (piqa, arc), acc",
            "elsewhere. Commands:",
            "",
        ]
        + [f"    {c}" for c in commands]
        + [""]
    )
    notes = {f"- {r['run']}: {r['note']}" for r in shown if r.get("note")}  # e.g. a run renamed later
    # zero-shot added later to a stored run (`--zero-shot`) ran on its own commit, from the stored pruned model
    # (dense: the pretrained one)
    notes |= {
        f"- {r['run']}" + ("" if r["run"] == "dense" else f" at {r['sparsity']}") + ": zero-shot added at commit "
        f"{r['zero_shot_commit']} from the "
        + ("pretrained" if r["run"] == "dense" else "stored pruned")
        + " model (same command with `--zero-shot`)"
        for r in shown
        if r.get("zero_shot_commit")
    }
    notes = sorted(notes)
    lines += (["Notes:", ""] + notes + [""]) if notes else []
    # 128 x 512 is the reporting calibration (the paper's): its table is quality.md, smaller screens get a suffix
    stem = "quality" if calibration == "128x512" else f"quality-{calibration}"
    (results / f"{stem}.md").write_text("\n".join(lines))
    plot(runs, results / f"{stem}.png")


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in runs if r["run"] != "dense"})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for axis, model in zip(axes[0], models):
        model_runs = [r for r in runs if r["model"] == model]
        # every point on the same windows: the fewest any pruned run has (the dense line is a prefix of its run)
        count = min(_windows(r, "wikitext2") for r in model_runs if r["run"] != "dense")
        series = defaultdict(list)
        for run in model_runs:
            if run["run"] != "dense":
                series[run["run"]].append((run["sparsity"], _ppl(run, "wikitext2", count)))
        for name in [n for n in ORDER if n in series]:
            points = sorted(series[name])
            axis.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                marker="o",
                label=name,
                color=COLOURS[name],
                linewidth=2.5 if name == "besa" else 1.5,
            )
        dense = _dense_on(model_runs, count)
        if dense:
            axis.axhline(_ppl(dense, "wikitext2", count), color="gray", linestyle="--", label="dense")
        axis.set_yscale("log")
        axis.set_xlabel("sparsity")
        axis.set_ylabel(f"WikiText2 perplexity at 2048, first {count} windows")
        axis.set_title(model)
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
