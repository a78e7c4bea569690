"""Choose the measured defaults on held-out data only, and write down why (bench/results/selection.md).

Each decision is a list of candidate settings. Every candidate prunes the demo model on the same
C4 calibration draw and is scored on held-out text only: the C4 train documents calibration did not
draw (`heldout`) and PTB's validation split (`ptb-valid`). The score is the mean log perplexity over
the two; the lowest wins. WikiText2 test, PTB test, C4 validation and the zero-shot items are never
read: `held_out()` refuses them, and the evaluation callbacks get nothing else.

    python bench/selection.py --data-dir DATA --decisions nm --nsamples 64 --seqlen 256 --max-windows 16
    python bench/selection.py --report          # selection.md from the stored runs only

Runs are stored in bench/results/selection/<decision>/<candidate>-<N>x<T>-w<W>.json and are not run
again (`--force` to redo).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import CODE, commit, run_one  # noqa: E402 (bench scripts import each other by path)

RESULTS = Path(__file__).resolve().parent / "results"
HELD_OUT = ("heldout", "ptb-valid")  # calibration-source documents not drawn; PTB validation
TEST_SETS = ("wikitext2", "ptb", "c4")  # WikiText2 test, PTB test, C4 validation

# decision -> (what it decides, sparsity, {candidate: settings}). Each candidate states every setting
# it is about, so a stored run stays what it was when a default changes. Candidates in REFERENCES are
# measured and shown but cannot be chosen: they answer whether the learned part pays at all.
REFERENCES = {"no-learned-part", "wanda-masks-kept"}
DECISIONS: dict[str, tuple[str, float, dict[str, dict]]] = {
    "nm": (
        "the closed-form part after BESA's learned channel scales under 2:4 (and, as a reference, the closed-form "
        "part with no learned part)",
        0.5,
        {
            "scales-select": {"method": "besa", "structure": "2:4", "reconstruct": "obs_select"},
            "scales-masks-kept": {"method": "besa", "structure": "2:4", "reconstruct": "obs"},
            "no-learned-part": {"method": "sparsegpt", "structure": "2:4", "reconstruct": "obs_select"},
            # where the learned scales start (Wanda's 2:4 masks), with the same closed-form part
            "wanda-masks-kept": {"method": "wanda", "structure": "2:4", "reconstruct": "obs"},
            # the scales re-rank SparseGPT's saliency instead of Wanda's: at 0 they give no-learned-part
            "scales-on-obs-saliency": {
                "method": "besa",
                "structure": "2:4",
                "importance": "sparsegpt",
                "reconstruct": "obs_select",
            },
        },
    ),
    "nm_lr": (
        "AdamW's learning rate for the channel scales under 2:4 (model.nm_lr)",
        0.5,
        {
            "lr-0.01": {"method": "besa", "structure": "2:4", "reconstruct": "obs", "nm_lr": 0.01},
            "lr-0.003": {"method": "besa", "structure": "2:4", "reconstruct": "obs", "nm_lr": 0.003},
            "lr-0.03": {"method": "besa", "structure": "2:4", "reconstruct": "obs", "nm_lr": 0.03},
        },
    ),
}
# SparseGPT's damping (model.percdamp) in the default's closed-form part, per sparsity band: the
# default (unset) is what these chose: 0.1 up to 60% sparsity (2:4 included) and 0.01 above.
for _band, _sparsity, _extra in [
    ("50", 0.5, {}),
    ("60", 0.6, {}),
    ("70", 0.7, {}),
    ("24", 0.5, {"structure": "2:4", "reconstruct": "obs", "nm_lr": 0.003}),
]:
    DECISIONS[f"damping-{_band}"] = (
        f"SparseGPT's damping in the default's closed-form part at {'2:4' if _extra else _band + '%'} (model.percdamp)",
        _sparsity,
        {f"d{d}": {"method": "besa", **_extra, "percdamp": d} for d in (0.01, 0.1)},
    )


def held_out(datasets: list[str]) -> list[str]:
    """The evaluation datasets, refusing any test split (the selection must never see one)."""
    for name in datasets:
        if name in TEST_SETS:
            raise SystemExit(f"bench/selection.py: {name} is a test split; choose settings on {' and '.join(HELD_OUT)}")
        if name not in HELD_OUT:
            raise SystemExit(f"bench/selection.py: unknown evaluation {name!r}; use {' and '.join(HELD_OUT)}")
    return list(datasets)


def score(perplexity: dict[str, float]) -> float:
    """Mean log perplexity over the held-out sets (lower is better)."""
    return sum(math.log(perplexity[name]) for name in HELD_OUT) / len(HELD_OUT)


def run_path(decision: str, candidate: str, args) -> Path:
    return RESULTS / "selection" / decision / f"{candidate}-{args.nsamples}x{args.seqlen}-w{args.max_windows}.json"


def measure(decision: str, args) -> None:
    _, sparsity, candidates = DECISIONS[decision]
    quality_args = SimpleNamespace(
        model=args.model,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        seed=0,
        data_dir=args.data_dir,
        ppl=held_out(list(HELD_OUT)),
        max_windows=args.max_windows,
        eval_batch=4,
        fidelity=None,
        zero_shot=False,
        dtype="float32",
        out=args.out,
        commit=commit(),
        code_commit=commit(*CODE),
    )
    for candidate, settings in candidates.items():
        if args.candidates and candidate not in args.candidates:
            continue
        path = run_path(decision, candidate, args)
        if path.exists() and not args.force:
            print(f"{path.name}: stored, skipped")
            continue
        root = Path(args.out) / args.model / f"select-{decision}-{path.stem}"  # one folder per stored run
        results = run_one(f"select-{decision}-{candidate}", settings, sparsity, root, quality_args)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=2, default=float))
        tmp.replace(path)
        print(f"{path.name}: {results['perplexity']} score {score(results['perplexity']):.4f}", flush=True)


def report(args) -> Path:
    lines = [
        "# Settings chosen on held-out data (bench/selection.py)",
        "",
        "Every candidate prunes the demo model on the same C4 calibration draw (seed 0) and is scored on",
        "held-out text only: the C4 train documents calibration did not draw (`heldout`) and PTB validation",
        "(`ptb-valid`), perplexity at 2048 tokens; score = mean log perplexity, lowest wins. No test split",
        "(WikiText2 test, PTB test, C4 validation, zero-shot items) is read by this script. Wall times are",
        "as measured, sometimes with other work on the machine: not speed figures.",
        "",
    ]
    for decision, (what, _sparsity, candidates) in DECISIONS.items():
        rows = []
        for candidate, settings in candidates.items():
            path = run_path(decision, candidate, args)
            if path.exists():
                rows.append((candidate, settings, json.loads(path.read_text())))
        if not rows:
            continue
        lines += [f"## {decision}: {what}", ""]
        lines += [
            "| candidate | settings | heldout | ptb-valid | score | wall s | commit |",
            "|---|---|---|---|---|---|---|",
        ]
        for candidate, settings, result in rows:
            ppl = result["perplexity"]
            shown = ", ".join(f"{k}={v}" for k, v in settings.items())
            lines.append(
                f"| {candidate} | {shown} | {ppl['heldout']:.3f} | {ppl['ptb-valid']:.3f} | "
                f"{score(ppl):.4f} | {result['wall_s']:.0f} | {result['commit']} |"
            )
        eligible = [row for row in rows if row[0] not in REFERENCES]
        best = min(eligible, key=lambda row: score(row[2]["perplexity"]))
        references = [row for row in rows if row[0] in REFERENCES]
        first = rows[0][2]
        env = first.get("environment", {})
        calibration = re.sub(r"\S*/(c4/\S+)", r"DATA/\1", first["calibration"])  # the user's own data path
        lines += [
            "",
            f"**Chosen: {best[0]}** ({len(rows)} of {len(candidates)} candidates measured). Calibration "
            f"{calibration}; first {args.max_windows} windows of each held-out set; torch "
            f"{env.get('torch')}, {env.get('torch_threads')} threads, CPU {env.get('cpu')}.",
            "",
        ]
        for name, _, result in references:
            verdict = "pays" if score(best[2]["perplexity"]) < score(result["perplexity"]) else "does not pay"
            lines += [
                f"Reference {name} (not a candidate): score {score(result['perplexity']):.4f} against the chosen "
                f"{score(best[2]['perplexity']):.4f}, so the learned part {verdict} here.",
                "",
            ]
    path = RESULTS / "selection.md"
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--decisions", nargs="+", default=list(DECISIONS), choices=list(DECISIONS))
    parser.add_argument("--candidates", nargs="+", help="only these candidates (default: all)")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--max-windows", type=int, default=16)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="runs/select")
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--report", action="store_true", help="only write selection.md from stored runs")
    args = parser.parse_args()
    if not args.report:
        for decision in args.decisions:
            measure(decision, args)
    print(f"wrote {report(args)}")


if __name__ == "__main__":
    main()
