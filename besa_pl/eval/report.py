"""The results table printed at the end of every fit, and results.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from besa_pl.atomic import write_json_atomic


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else the platform's word): its SIMD width
    changes float sums, and so masks."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    """The software, CPU and threads a result came from: the same code can give other floats (and
    so other masks) under another torch / transformers version, CPU or thread count."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch

    found = {"python": platform.python_version(), "torch_threads": torch.get_num_threads(), "cpu": cpu_model()}
    for package in ("besa-pl", "torch", "transformers", "lightning", "lm-eval"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def result_rows(results: dict[str, Any]) -> list[tuple[str, str]]:
    """(metric, value) rows: method, sparsity, perplexity per dataset, zero-shot per task and mean."""
    rows = [
        ("method", str(results.get("variant", results.get("method")))),
        ("target sparsity", f"{results.get('target_sparsity', 0.0):.4f}"),
        ("realised sparsity", f"{results.get('realised_sparsity', 0.0):.4f}"),
    ]
    for name, value in results.get("perplexity", {}).items():
        details = results.get("perplexity_details", {}).get(name, {})
        scope = f"{details.get('windows')} x {details.get('seqlen')}"
        if not details.get("all_windows", True):
            scope += ", partial"
        rows.append((f"perplexity {name} ({scope})", f"{value:.3f}"))
    for name, reason in results.get("perplexity_skipped", {}).items():
        rows.append((f"perplexity {name}", f"skipped: {reason}"))
    fidelity = results.get("fidelity")
    if fidelity:
        scope = f"{fidelity['texts']} x {fidelity['seqlen']} dense-written tokens"
        rows.append((f"fidelity KL to dense ({scope})", f"{fidelity['kl']:.4f}"))
        rows.append(("fidelity top-1 agreement", f"{100 * fidelity['top1_agreement']:.2f}"))
        rows.append(
            ("fidelity perplexity (dense)", f"{fidelity['perplexity_pruned']:.3f} ({fidelity['perplexity_dense']:.3f})")
        )
    zero_shot = results.get("zero_shot", {})
    for name, scores in zero_shot.get("tasks", {}).items():
        for metric, value in scores.items():
            rows.append((f"{name} {metric}", f"{100 * value:.2f}"))
    for name, reason in zero_shot.get("skipped", {}).items():
        rows.append((f"{name}", f"skipped: {reason}"))
    for metric in ("mean_acc", "mean_acc_norm"):
        if zero_shot.get(metric) is not None:
            rows.append((f"zero-shot {metric.replace('_', ' ')}", f"{100 * zero_shot[metric]:.2f}"))
    return rows


def report(results: dict[str, Any], root: str | Path, console: Console) -> None:
    table = Table(title="besa-pl results")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for metric, value in result_rows(results):
        table.add_row(metric, value)
    console.print(table)
    if results.get("zero_shot", {}).get("limit"):
        console.print(f"zero-shot limited to {results['zero_shot']['limit']} items per task")
    write_json_atomic(Path(root) / "results.json", results)
