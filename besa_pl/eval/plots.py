"""DIR/allocation.png: where the sparsity went, per layer type and block, and how rows spread."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from besa_pl.atomic import atomic_file


def layer_type(name: str) -> str:
    return name.split(".")[-1].removesuffix("_proj")


def allocation_figure(records: list[dict], title: str):
    """Left: realised sparsity of each layer type (rows) in each block (columns). Right: the learned
    per-row rates of each layer type over all blocks (BESA only), as a histogram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    types = list(dict.fromkeys(layer_type(name) for record in records for name in record["layers"]))
    grid = np.full((len(types), len(records)), np.nan)
    for column, record in enumerate(records):
        for name, value in record["layers"].items():
            grid[types.index(layer_type(name)), column] = value
    learned = [r for r in records if "learned_rates" in r]
    fig, axes = plt.subplots(
        1,
        2 if learned else 1,
        figsize=(13 if learned else 9, 0.45 * len(types) + 2.2),
        gridspec_kw={"width_ratios": [3, 1]} if learned else None,
        squeeze=False,
    )
    heat = axes[0][0]
    spread = max(abs(np.nanmax(grid) - np.nanmean(grid)), abs(np.nanmean(grid) - np.nanmin(grid)), 1e-3)
    image = heat.imshow(
        grid, aspect="auto", cmap="RdBu_r", vmin=np.nanmean(grid) - spread, vmax=np.nanmean(grid) + spread
    )
    heat.set_yticks(range(len(types)), types)
    heat.set_xticks(range(0, len(records), max(1, len(records) // 15)))
    heat.set_xlabel("block")
    heat.set_title(f"{title}: realised sparsity per layer type and block")
    fig.colorbar(image, ax=heat, fraction=0.03, pad=0.02)
    if learned:
        rates = axes[0][1]
        edges = np.linspace(
            0, 1, len(learned[0]["learned_rates"][next(iter(learned[0]["learned_rates"]))]["histogram"]) + 1
        )
        centres = (edges[:-1] + edges[1:]) / 2
        for kind in types:
            counts = sum(
                np.array(r["learned_rates"][name]["histogram"], dtype=float)
                for r in learned
                for name in r["learned_rates"]
                if layer_type(name) == kind
            )
            rates.plot(centres, counts / max(counts.sum(), 1), marker=".", label=kind)
        rates.set_xlabel("learned per-row rate")
        rates.set_ylabel("share of rows")
        rates.set_title("rows' learned rates")
        nonzero = [
            c for r in learned for v in r["learned_rates"].values() for c, n in zip(centres, v["histogram"]) if n
        ]
        rates.set_xlim(max(0.0, min(nonzero) - 0.05), min(1.0, max(nonzero) + 0.05))
        rates.legend(fontsize=8)
    fig.tight_layout()
    return fig


def save_allocation_plot(records: list[dict], path: str | Path, title: str, logger=None) -> Path:
    """Write the figure (atomically) and hand it to the Trainer's logger when it takes images."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fig = allocation_figure(records, title)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    experiment = getattr(logger, "experiment", None)
    if hasattr(experiment, "add_figure"):  # TensorBoard
        experiment.add_figure("allocation", fig)
    plt.close(fig)
    return path
