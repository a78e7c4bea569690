"""sparsity.json (the marker of a finished run) and atomic JSON writing."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

FINISHED_MARKER = "sparsity.json"


def write_json_atomic(path: str | Path, data: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=float) + "\n")
    os.replace(tmp, path)


def sparsity_report(records: list[dict], settings) -> dict[str, Any]:
    """Realised sparsity per linear, per block and overall (counted in the written weights), and the
    learned rates, from the finished blocks' records."""
    blocks, zeros, total = {}, 0.0, 0
    for record in records:
        blocks[str(record["block"])] = {"sparsity": record["realised_sparsity"], "layers": record["layers"]}
        zeros += record["realised_sparsity"] * record["weights"]
        total += record["weights"]
    return {
        "overall": zeros / total if total else 0.0,
        "blocks": blocks,
        "method": settings.method,
        "target": settings.target,
        "structure": settings.structure,
        "learned_rates": {str(r["block"]): r["learned_rates"] for r in records if "learned_rates" in r},
        "expected_sparsity": {str(r["block"]): r["expected_sparsity"] for r in records},
    }


def is_finished_run(root: str | Path) -> bool:
    return (Path(root) / FINISHED_MARKER).exists()
