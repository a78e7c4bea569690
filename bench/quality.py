"""Quality benchmark: several pruning methods on the same calibration, evaluated on the same windows.

Every run goes through the same Trainer, BlockwiseLoop and evaluation callbacks as `besa-pl fit`
and writes its results to `bench/results/runs/<model>/<run>-s<sparsity>-<N>x<T>.json`; a run whose
file exists is not measured again (`--force` to redo) unless it came from other code (another
`code_commit`: the last commit that changed besa_pl/ or this script), which moves it to
bench/results/archive/runs/<run>@<code commit>.json and runs it again. `--table` writes
bench/results/quality.md and .png (128 x 512 calibration; quality-<N>x<T>.* for others) from the stored runs of the current code commit
with that calibration, and refuses a table whose rows differ in environment.

    python bench/quality.py --data-dir path/to/data --sparsities 0.5 0.6 0.7 \\
        --runs dense magnitude wanda sparsegpt besa-paper wanda-obs besa --max-windows 40
    python bench/quality.py --table
    python bench/quality.py --data-dir DATA --nsamples 64 --seqlen 256 --max-windows 16 --fidelity 8 256 \
        --runs dense magnitude wanda sparsegpt besa-paper wanda-obs besa      # then bench/fidelity_ranks.py

A run name is a preset below, or `name:key=value,key=value` with BESAPruner / data settings
(`data.batch_size=4`), e.g. `besa-s3:reconstruct=obs,smoothing_scale=3`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
FIDELITY_SEED = 1234  # cli.yaml's: the dense model's own text, never the calibration (seed 0, C4)

PRESETS: dict[str, dict] = {
    "dense": {"method": "dense"},
    "magnitude": {"method": "magnitude"},
    "wanda": {"method": "wanda"},
    "sparsegpt": {"method": "sparsegpt"},
    # The paper's BESA: official floor rule and settings, no reconstruction.
    "besa-paper": {
        "method": "besa",
        "exact_sparsity": False,
        "reconstruct": "none",
        "smoothing_scale": 1.0,
        "data.batch_size": 1,
    },
    "besa-paper-exact": {"method": "besa", "reconstruct": "none", "smoothing_scale": 1.0, "data.batch_size": 1},
    # Wanda's uniform masks with the same reconstruction as besa-d0.01: what the learned allocation adds.
    "wanda-obs": {"method": "wanda", "reconstruct": "obs_select", "reconstruct_reference": "layer", "percdamp": 0.01},
    # The previous default: the same, with the kept weights as the sweep leaves them.
    "besa-sweep": {"method": "besa", "reconstruct_solve": "sweep"},
    # The default from commit 110cf63 to af133c3: the kept weights solved exactly, the masks not refined.
    "besa-exact": {"method": "besa", "reconstruct_swaps": 0},
    # The default with SparseGPT's damping 0.01 at every sparsity (the default until commit 7e25baf).
    "besa-d0.01": {"method": "besa", "percdamp": 0.01},
    # The default with ten times that at every sparsity (the default at ac6c493 only).
    "besa-d0.1": {"method": "besa", "percdamp": 0.1},
    # The default of besa-pl (cli.yaml, and the code's defaults): BESA's allocation, SparseGPT's sweep
    # choosing within its counts, then the kept weights solved exactly for the final masks and the
    # masks refined by swaps inside each row; damping 0.1 up to 50% sparsity, 0.01 above.
    "besa": {"method": "besa"},
    # N:M (the sparsity GPUs accelerate). "-24" / "-48": 2:4 / 4:8. *-obs-*: that method's N:M masks
    # kept, with the default's closed-form part under them (exact solve, swaps inside each group): the
    # default path with another method's masks in place of BESA's learned ones; besa-*: the default.
    "wanda-24": {"method": "wanda", "structure": "2:4"},
    "sparsegpt-24": {"method": "sparsegpt", "structure": "2:4"},
    "wanda-obs-24": {"method": "wanda", "structure": "2:4", "reconstruct": "obs"},
    "sparsegpt-obs-24": {"method": "sparsegpt", "structure": "2:4", "reconstruct": "obs"},
    "besa-24": {"method": "besa", "structure": "2:4"},
    "wanda-48": {"method": "wanda", "structure": "4:8"},
    "sparsegpt-48": {"method": "sparsegpt", "structure": "4:8"},
    "wanda-obs-48": {"method": "wanda", "structure": "4:8", "reconstruct": "obs"},
    "sparsegpt-obs-48": {"method": "sparsegpt", "structure": "4:8", "reconstruct": "obs"},
    "besa-48": {"method": "besa", "structure": "4:8"},
    # Self-calibration (Williams et al., NAACL 2025): the model's own text instead of C4.
    "sparsegpt-self": {"method": "sparsegpt", "data.dataset": "self"},
    "besa-self": {"method": "besa", "data.dataset": "self"},
}


def parse_run(spec: str) -> tuple[str, dict]:
    name, _, settings = spec.partition(":")
    if not settings:
        if name not in PRESETS:
            raise SystemExit(f"unknown run {name!r}; use one of {', '.join(PRESETS)} or name:key=value,...")
        return name, dict(PRESETS[name])
    values: dict = {}
    for item in settings.split(","):
        key, _, raw = item.partition("=")
        try:
            values[key] = json.loads(raw)
        except json.JSONDecodeError:
            values[key] = raw
    return name, values


def commit(*paths: str) -> str:
    """HEAD, or with `paths` the last commit that changed them (the code a result depends on)."""
    command = ["git", "log", "-1", "--format=%h", "--", *paths] if paths else ["git", "rev-parse", "--short", "HEAD"]
    try:
        return subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        return "unknown"


# What a result depends on: the package and this script. Commits that change only docs or results
# leave it, so the rows of one table may come from such commits and still be one code state.
CODE = ("../besa_pl", "quality.py")


def run_one(name: str, settings: dict, sparsity: float, root: Path, args) -> dict:
    from besa_pl import BESAPruner, CalibrationDataModule
    from besa_pl.callbacks import FidelityEval, PerplexityEval, ZeroShotEval
    from besa_pl.loop.trainer import make_trainer

    model_settings = {k: v for k, v in settings.items() if not k.startswith("data.")}
    data_settings = {k.removeprefix("data."): v for k, v in settings.items() if k.startswith("data.")}
    pruner = BESAPruner(pretrained=args.model, sparsity=sparsity, dtype=args.dtype, **model_settings)
    data_settings.setdefault("dataset", "c4")  # `data.dataset=self`: the model's own text
    data = CalibrationDataModule(
        nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, data_dir=args.data_dir, **data_settings
    )
    callbacks = [
        PerplexityEval(datasets=args.ppl, seqlen=2048, batch_size=args.eval_batch, max_windows=args.max_windows)
    ]
    if args.fidelity:
        callbacks.append(FidelityEval(nsamples=args.fidelity[0], seqlen=args.fidelity[1], seed=FIDELITY_SEED))
    if args.zero_shot and sparsity in args.zero_shot_sparsities:
        callbacks.append(ZeroShotEval(limit=args.zero_shot_limit, batch_size=32))
    trainer = make_trainer(root, callbacks, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    start = time.perf_counter()
    trainer.fit(pruner, datamodule=data)
    results = dict(pruner.results)
    results.update(
        wall_s=time.perf_counter() - start,
        run=name,
        settings=settings,
        sparsity=sparsity,
        model=args.model,
        calibration=f"{args.nsamples} x {args.seqlen} tokens, {data.source}, seed {args.seed}",
        commit=args.commit,
        code_commit=args.code_commit,
        command="python bench/quality.py " + " ".join(sys.argv[1:]),
    )
    return results


def evaluate_stored(stored: dict, source: str, root: Path, args) -> dict:
    """Adds the full zero-shot evaluation to a stored run from its saved model (no pruning or
    perplexity again)."""
    from besa_pl import BESAPruner, CalibrationDataModule
    from besa_pl.callbacks import ZeroShotEval
    from besa_pl.loop.trainer import make_trainer

    pruner = BESAPruner(pretrained=source, method="dense", dtype=args.dtype)
    data = CalibrationDataModule(nsamples=1, seqlen=16, seed=0, data_dir=args.data_dir, dataset="c4")
    callbacks = [ZeroShotEval(limit=args.zero_shot_limit, batch_size=32)]
    trainer = make_trainer(
        root / "zero-shot", callbacks, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False
    )
    start = time.perf_counter()
    trainer.fit(pruner, datamodule=data)
    return {
        **stored,
        "zero_shot": pruner.results["zero_shot"],
        "zero_shot_wall_s": time.perf_counter() - start,
        "zero_shot_commit": args.commit,
    }


def result_path(args, name: str, sparsity: float) -> Path:
    windows = f"-w{args.max_windows}" if args.max_windows else ""  # a partial evaluation is its own run
    seed = f"-seed{args.seed}" if args.seed else ""  # calibration seed 0 keeps the older files' names
    return RESULTS / "runs" / args.model / f"{name}-s{sparsity}-{args.nsamples}x{args.seqlen}{seed}{windows}.json"


def archive_stale(path: Path, stored: dict, folder: Path) -> Path:
    """Move a run of other code to `folder` under a name that says its code commit, so that the
    archive keeps every earlier state instead of the latest one replacing the one before."""
    state = stored.get("code_commit") or stored.get("commit") or "unknown"
    archive = folder / f"{path.stem}@{state}{path.suffix}"
    for n in range(1, 1000):
        if not archive.exists():
            break
        archive = folder / f"{path.stem}@{state}-{n}{path.suffix}"
    folder.mkdir(parents=True, exist_ok=True)
    path.replace(archive)
    return archive


def satisfied(stored: dict, args, sparsity: float, zero_shot: bool = True) -> bool:
    """Whether a stored run already has every evaluation asked for (zero-shot too unless told not
    to look), on the same windows."""
    for dataset in args.ppl:
        details = stored.get("perplexity_details", {}).get(dataset)
        if details is None:
            return False
        if args.max_windows is None and not details["all_windows"]:
            return False
        if args.max_windows is not None and details["windows"] != args.max_windows and not details["all_windows"]:
            return False
    if args.fidelity and stored.get("method") != "dense":
        found = stored.get("fidelity")
        if found is None or [found["texts"], found["seqlen"]] != args.fidelity:
            return False
    wants_zero_shot = zero_shot and args.zero_shot and sparsity in args.zero_shot_sparsities
    # a run without zero-shot has no "zero_shot" at all (its limit would read None, like a full one)
    return not wants_zero_shot or ("zero_shot" in stored and stored["zero_shot"].get("limit") == args.zero_shot_limit)


def measure(args) -> None:
    args.commit = commit()  # the code this process imported, even if HEAD moves while it runs
    args.code_commit = commit(*CODE)
    for sparsity in args.sparsities:
        for spec in args.runs:
            name, settings = parse_run(spec)
            dense = settings.get("method") == "dense"
            if dense and sparsity != args.sparsities[0]:
                continue  # the dense row does not depend on the sparsity
            path = result_path(args, name, 0.0 if dense else sparsity)
            stored = json.loads(path.read_text()) if path.exists() and not args.force else None
            if stored is not None and stored.get("code_commit") != args.code_commit:
                # another code state: one table must not mix it with this one, so it is run again
                # and the old file kept in the archive
                archive = archive_stale(path, stored, RESULTS / "archive" / "runs" / args.model)
                print(f"{path.name}: from code commit {stored.get('code_commit')}, moved to {archive}; running again")
                stored = None
            other = set(stored.get("perplexity", {})) - set(args.ppl) if stored is not None else set()
            if other and not args.force:  # the file name does not say the datasets: never overwrite others'
                raise SystemExit(
                    f"{path.name} holds a run evaluated on {', '.join(sorted(other))}; give this run another name "
                    "(NAME:method=..., see the module docstring) or --force to replace it"
                )
            if stored is not None and satisfied(stored, args, sparsity):
                print(f"{path.name}: stored, skipped")
                continue
            # one output folder per result file: a later zero-shot evaluation of this run must read
            # this run's model, not one of another seed or calibration with the same name
            root = Path(args.out) / args.model / path.stem
            # the dense model is the pretrained one; a pruned run saved its model under root/pruned
            source = args.model if dense else str(root / "pruned")
            saved = dense or Path(source).is_dir()
            if stored is not None and satisfied(stored, args, sparsity, zero_shot=False) and saved:
                results = evaluate_stored(stored, source, root, args)  # only the zero-shot evaluation is missing
            else:
                results = run_one(name, settings, sparsity, root, args)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(results, indent=2, default=float))
            tmp.replace(path)
            ppl = {d: round(v, 3) for d, v in results.get("perplexity", {}).items()}
            print(
                f"{path.name}: {ppl} realised {results['realised_sparsity']:.4f} wall {results['wall_s']:.0f}s",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--runs", nargs="+", default=["dense", "sparsegpt", "besa"])
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.5])
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0, help="the calibration draw's seed")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--ppl", nargs="+", default=["wikitext2"], help="wikitext2 c4 ptb heldout")
    parser.add_argument("--max-windows", type=int, default=None)
    parser.add_argument("--eval-batch", type=int, default=4)
    parser.add_argument(
        "--fidelity",
        nargs=2,
        type=int,
        metavar=("TEXTS", "TOKENS"),
        help="also FidelityEval on TEXTS x TOKENS the dense model writes (seed 1234; cli.yaml: 8 256)",
    )
    parser.add_argument("--zero-shot", action="store_true", help="full zero-shot tasks (see --zero-shot-limit)")
    parser.add_argument("--zero-shot-limit", type=int, default=None)
    parser.add_argument("--zero-shot-sparsities", nargs="+", type=float, default=[0.5])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", default="runs/quality")
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--table", action="store_true", help="only write quality.md / quality.png from stored runs")
    args = parser.parse_args()
    if not args.table:
        measure(args)
    if args.table:
        from quality_table import write_table

        write_table(RESULTS, f"{args.nsamples}x{args.seqlen}", commit(*CODE))


if __name__ == "__main__":
    main()
