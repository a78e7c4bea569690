"""bench/results/quality.md and quality.png from the stored runs of bench/quality.py."""

from __future__ import annotations

import json
import math
import re
from collections import Counter, defaultdict
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
    "wanda-24",
    "sparsegpt-24",
    "wanda-obs-24",
    "sparsegpt-obs-24",
    "besa-24",
    "wanda-48",
    "sparsegpt-48",
    "wanda-obs-48",
    "sparsegpt-obs-48",
    "besa-48",
]
# What must agree between the rows of one table (bench/quality.py records it in every run).
ENVIRONMENT_KEYS = ("torch", "transformers", "lightning", "torch_threads", "cpu")
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
    "wanda-24": "C1",
    "sparsegpt-24": "C2",
    "wanda-obs-24": "C4",
    "sparsegpt-obs-24": "C5",
    "besa-24": "black",
    "wanda-48": "C1",
    "sparsegpt-48": "C2",
    "wanda-obs-48": "C4",
    "sparsegpt-obs-48": "C5",
    "besa-48": "black",
}
TASKS = ["piqa", "boolq", "winogrande", "arc_easy", "arc_challenge"]


def load_runs(results: Path) -> list[dict]:
    runs = []
    for path in sorted((results / "runs").glob("*/*.json")):
        run = json.loads(path.read_text())
        run["file"] = path.name
        run["calibration_key"] = re.search(r"-(\d+x\d+)(-seed\d+)?(-w\d+)?$", path.stem).group(1)
        runs.append(run)
    return runs


def setting(run: dict) -> str:
    """The table a run belongs in: its N:M structure ("2:4"), else its sparsity ("0.5")."""
    return (run.get("settings") or {}).get("structure") or str(run["sparsity"])


def code_state(run: dict) -> tuple:
    """The code commit and environment a run came from; rows of one table must share it."""
    env = run.get("environment") or {}
    return (run.get("code_commit"),) + tuple(env.get(key) for key in ENVIRONMENT_KEYS)


def check_one_state(rows: list[dict], where: str) -> None:
    """Refuse a table whose rows come from different code or environments, naming the odd rows."""
    states = defaultdict(list)
    for run in rows:
        states[code_state(run)].append(run["file"])
    if len(states) > 1:
        newest = max(states, key=lambda state: len(states[state]))
        stale = sorted(f for state, files in states.items() if state != newest for f in files)
        raise SystemExit(
            f"{where}: rows from {len(states)} code commits / environments; re-run {', '.join(stale)} with "
            "bench/quality.py --force on this commit (or move them to bench/results/archive/)"
        )


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


def _spread(values: list, digits: int) -> str:
    """One value, or the mean +/- sample standard deviation over seeds; '-' when any is missing."""
    if not values or any(v is None for v in values):
        return "-"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{mean:.{digits}f} +/- {sd:.{digits}f}"


def _seed(run: dict) -> int:
    """The calibration draw's seed, as the run recorded it ("64 x 256 tokens, ..., seed 1")."""
    return int(re.search(r"seed (\d+)", run["calibration"]).group(1))


def _windows(run: dict, dataset: str) -> int | None:
    return run.get("perplexity_details", {}).get(dataset, {}).get("windows")


def _dense_on(runs: list[dict], windows: int, state: tuple | None = None) -> dict | None:
    """A dense run that has the first `windows` windows (a prefix of a longer run serves), from the
    code and environment `state` when one such exists."""
    found = [r for r in runs if r["run"] == "dense" and _ppl(r, "wikitext2", windows) is not None]
    return next((r for r in found if code_state(r) == state), found[0] if found else None)


def write_table(results: Path, calibration: str, code_commit: str) -> None:
    """The tables of every stored run of `code_commit` (the last commit that changed the package or
    bench/quality.py) measured on WikiText2 with this calibration; the dense model needs none, so any
    dense run of that code serves. Runs of other code are left out (older ones stay in
    bench/results/runs/ and bench/results/archive/). Runs of another environment (a calibration re-run on
    another machine) get tables of their own; a dense reference from another environment is refused."""
    runs = [
        r
        for r in load_runs(results)
        if r.get("run") in ORDER
        and r.get("code_commit") == code_commit
        and "wikitext2" in r.get("perplexity", {})
        and (r["calibration_key"] == calibration or r["run"] == "dense")
    ]
    if not runs:
        raise SystemExit(f"no stored run of code commit {code_commit} with {calibration} calibration; run them first")
    # one table per code state: a calibration run again on another machine gets tables of its own,
    # each with its own dense and SparseGPT references, never rows mixed across machines
    states = [state for state, _ in Counter(code_state(run) for run in runs).most_common()]
    primary = states[0]
    lines = [
        "# Quality benchmark",
        "",
        f"Every row: code commit {code_commit} (the last commit that changed besa_pl/ or bench/quality.py), one",
        "environment per table: "
        + _environment(primary)
        + ("" if len(states) == 1 else ", unless its title names another")
        + ".",
        "",
    ]
    shown: list[dict] = []  # the runs in the tables, whose commands the caption lists
    for model in sorted({r["model"] for r in runs if r["run"] != "dense"}):  # models with pruned runs
        model_runs = [r for r in runs if r["model"] == model]
        lines += [f"## {model}", ""]
        keys = sorted({setting(r) for r in model_runs if r["run"] != "dense"}, key=lambda k: (":" in k, k))
        for key in keys:
            for state in states:
                rows = [r for r in model_runs if setting(r) == key and r["run"] != "dense" and code_state(r) == state]
                if rows:
                    title = "" if state == primary else f" ({_environment(state, unlike=primary)})"
                    shown += _section(lines, key, rows, model_runs, title)
    # the data folder is the user's own path: shown as DATA
    commands = sorted({re.sub(r"--data-dir \S+", "--data-dir DATA", r["command"]) for r in shown if r.get("command")})
    samples, tokens = calibration.split("x")
    lines += (
        [
            f"Calibration: {samples} x {tokens} tokens of the local C4 train excerpt (`c4/c4_sample.jsonl`, the first 1000",
            "documents of shard 00000), the SparseGPT/Wanda recipe; calibration seed 0 unless a table lists each",
            "seed under it (a row of several seeds: mean +/- standard deviation; each seed's distance is taken",
            "against SparseGPT's on the same draw).",
            "Zero-shot: full local task files",
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
    plot([r for r in runs if code_state(r) == primary], results / f"{stem}.png")  # the first environment's


def _environment(state: tuple, unlike: tuple | None = None) -> str:
    """A code state's environment in words; with `unlike`, only where the two differ."""
    pairs = zip(ENVIRONMENT_KEYS, state[1:], (unlike or state)[1:])
    return ", ".join(f"{key} {value}" for key, value, other in pairs if unlike is None or value != other)


def _section(lines: list[str], key: str, rows: list[dict], model_runs: list[dict], title: str) -> list[dict]:
    """One table: the pruned `rows` of one setting and code state, with the dense reference on the same
    windows; appends its lines and returns the runs it shows."""
    count = min(w for w in (_windows(r, "wikitext2") for r in rows) if w is not None)
    # the dense reference on the same windows as the pruned rows (a prefix of a longer run)
    dense = _dense_on(model_runs, count, code_state(rows[0]))
    rows = rows + ([dense] if dense else [])
    check_one_state(rows, f"{rows[0]['model']} {key}{title}")
    by_run = defaultdict(list)  # one row per run name: its calibration seeds together
    for run in rows:
        by_run[run["run"]].append(run)
    names = sorted(by_run, key=ORDER.index)
    reference = next((n for n in names if n.split("-")[0] == "sparsegpt" and "obs" not in n), None)
    d = _ppl(dense, "wikitext2", count) if dense else None
    kind = f"{key} structure" if ":" in key else f"sparsity {key}"
    lines += [
        f"### {kind}{title}: WikiText2 perplexity at 2048 over the first {count} windows",
        "",
        "| method | seeds | realised sparsity | WikiText2 | distance to dense / SparseGPT's | first 40 windows | "
        + " | ".join(TASKS)
        + " | mean acc | mean acc_norm | commit |",
        "|---" * (9 + len(TASKS)) + "|",
    ]
    for name in names:
        group = by_run[name]
        ppls = [_ppl(r, "wikitext2", count) for r in group]
        ratios = []
        if d is not None and reference and name != "dense":
            seeds = {r["calibration"]: _ppl(r, "wikitext2", count) for r in by_run[reference]}
            # each seed against SparseGPT on the same calibration draw
            ratios = [(p - d) / (seeds[r["calibration"]] - d) for r, p in zip(group, ppls) if r["calibration"] in seeds]
        run = group[0]
        zero = run.get("zero_shot", {}) if run.get("zero_shot", {}).get("limit") is None else {}
        accs = [f"{100 * zero['tasks'][t]['acc']:.2f}" if t in zero.get("tasks", {}) else "-" for t in TASKS]
        # runs stored before mean_acc_norm existed: recomputed from their per-task scores
        means = task_means(zero.get("tasks", {})) if zero else {}
        mean = " | ".join(
            f"{100 * means[m]:.2f}" if means.get(m) is not None else "-" for m in ("mean_acc", "mean_acc_norm")
        )
        lines.append(
            f"| {name} | {len(group)} | {run['realised_sparsity']:.4f} | {_spread(ppls, 2)} | "
            f"{_spread(ratios, 3)} | {_spread([_ppl(r, 'wikitext2', 40) for r in group], 2)} | "
            + " | ".join(accs)
            + f" | {mean} | {', '.join(sorted({r.get('commit', '?') for r in group}))} |"
        )
    # several seeds, or another seed than 0: each draw's figure, so that paired differences can be read off
    listed = [name for name in names if name != "dense" and (len(by_run[name]) > 1 or _seed(by_run[name][0]) != 0)]
    lines += [""] if listed else []
    for name in listed:
        each = sorted((_seed(r), _ppl(r, "wikitext2", count)) for r in by_run[name])
        lines.append(f"- {name} per seed: " + ", ".join(f"seed {k} {_fmt(v)}" for k, v in each))
    lines.append("")
    return rows


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in runs if r["run"] != "dense"})
    structured = {m: [r for r in runs if r["model"] == m and ":" in setting(r)] for m in models}
    panels = [(m, "sparsity") for m in models] + [(m, "n:m") for m in models if structured[m]]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for axis, (model, kind) in zip(axes[0], panels):
        if kind == "n:m":
            _bars(axis, model, structured[model], runs)
            continue
        model_runs = [r for r in runs if r["model"] == model and ":" not in setting(r)]
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


def _bars(axis, model: str, rows: list[dict], runs: list[dict]) -> None:
    """The N:M panel: one bar per method and structure (mean over seeds), the dense line for scale."""
    count = min(_windows(r, "wikitext2") for r in rows)
    groups = defaultdict(list)
    for run in rows:
        groups[(setting(run), run["run"])].append(_ppl(run, "wikitext2", count))
    keys = sorted(groups, key=lambda k: (k[0], ORDER.index(k[1])))
    values = [sum(groups[k]) / len(groups[k]) for k in keys]
    axis.bar(range(len(keys)), values, color=[COLOURS[k[1]] for k in keys])
    # Run names are long ("sparsegpt-obs-48"): slanted labels keep neighbours from overlapping.
    axis.set_xticks(range(len(keys)), [f"{k[1]} ({k[0]})" for k in keys], fontsize=7, rotation=30, ha="right")
    dense = _dense_on([r for r in runs if r["model"] == model], count)
    if dense:
        axis.axhline(_ppl(dense, "wikitext2", count), color="gray", linestyle="--", label="dense")
        axis.legend(fontsize=8)
    axis.set_yscale("log")
    axis.set_ylabel(f"WikiText2 perplexity at 2048, first {count} windows")
    axis.set_title(f"{model}: N:M")
