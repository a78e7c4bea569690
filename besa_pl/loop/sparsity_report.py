"""sparsity.json: what was pruned where; its presence marks a finished run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

FINISHED_MARKER = "sparsity.json"


def sparsity_report(records: list[dict], settings) -> dict[str, Any]:
    """Realised sparsity per linear, per block and overall (counted in the written weights), and the
    learned rates, from the finished blocks' records."""
    blocks, zeros, total = {}, 0.0, 0
    for record in records:
        blocks[str(record["block"])] = {"sparsity": record["realised_sparsity"], "layers": record["layers"]}
        zeros += record["realised_sparsity"] * record["weights"]
        total += record["weights"]
    report = {
        "overall": zeros / total if total else 0.0,
        "blocks": blocks,
        "method": settings.method,
        "target": settings.target,
        "structure": settings.structure,
        "learned_rates": {str(r["block"]): r["learned_rates"] for r in records if "learned_rates" in r},
        "expected_sparsity": {str(r["block"]): r["expected_sparsity"] for r in records},
    }
    if settings.nm is not None:  # the exact check of every written linear (loop/nm_check.py)
        n, m = settings.nm
        checked = [r["n_of_m"] for r in records]
        report["n_of_m"] = {
            "n": n,
            "m": m,
            "groups": sum(c["groups"] for c in checked),
            "groups_over_n": sum(c["groups_over_n"] for c in checked),
        }
    if any("learned_scales" in r for r in records):
        report["learned_scales"] = {str(r["block"]): r["learned_scales"] for r in records if "learned_scales" in r}
    return report


def is_finished_run(root: str | Path) -> bool:
    return (Path(root) / FINISHED_MARKER).exists()
