"""HardwareSimulation: simulated accelerator cycles per projection type, plus measured latency."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
from lightning.pytorch import Callback
from rich.table import Table

from besa_pl.console import console
from besa_pl.errors import BesaError, at_least, positive
from besa_pl.eval.hwsim import Accelerator, dense_cycles, matrix_cycles
from besa_pl.eval.latency import (
    forward_latency,
    is_two_four,
    semi_structured_latency,
    semi_structured_skip_reason,
)
from besa_pl.models.loading import decoder_blocks, prunable_linears


def projection_type(name: str) -> str:
    return name.split(".")[-1].removesuffix("_proj")


@torch.no_grad()
def simulate(linear_weights: Iterable[tuple[str, torch.Tensor]], acc: Accelerator) -> dict:
    """Per projection type, averaged over blocks: sparsity, dense and sparse cycles, speed-up.
    `linear_weights` yields (name, weight) for every prunable linear of every block."""
    sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    counts: dict[str, int] = defaultdict(int)
    zeros = weights = 0
    for name, weight in linear_weights:
        kind = projection_type(name)
        mask = weight != 0
        sums[kind]["sparsity"] += 1 - float(mask.float().mean())
        sums[kind]["dense_cycles"] += dense_cycles(*mask.shape, acc)
        sums[kind]["sparse_cycles"] += matrix_cycles(mask, acc).cycles
        counts[kind] += 1
        zeros += int((~mask).sum())
        weights += mask.numel()
    table = {}
    for kind, values in sums.items():
        row = {key: value / counts[kind] for key, value in values.items()}
        row["speedup"] = row["dense_cycles"] / row["sparse_cycles"] if row["sparse_cycles"] else float("inf")
        table[kind] = row
    total_dense = sum(row["dense_cycles"] for row in table.values())
    total_sparse = sum(row["sparse_cycles"] for row in table.values())
    table["block"] = {
        "sparsity": zeros / weights if weights else 0.0,
        "dense_cycles": total_dense,
        "sparse_cycles": total_sparse,
        "speedup": total_dense / total_sparse if total_sparse else float("inf"),
    }
    return table


class HardwareSimulation(Callback):
    """Simulated speed-up on a ViTCoD-style sparse accelerator, and measured latency on this machine.

    Args:
        pe_rows, pe_cols: PE array size (64 x 64 in the paper).
        theta: initial dense-column threshold.
        theta_step: step of the threshold's adaptation.
        tries: adaptation steps tried.
        measure_latency: also time the model's forward pass (and 2:4 kernels on a CUDA GPU).
        latency_seqlen: tokens per timed forward pass.
    """

    def __init__(
        self,
        pe_rows: int = 64,
        pe_cols: int = 64,
        theta: float = 0.5,
        theta_step: float = 0.1,
        tries: int = 5,
        measure_latency: bool = True,
        latency_seqlen: int = 128,
    ) -> None:
        at_least("HardwareSimulation.pe_rows", pe_rows, 1)
        at_least("HardwareSimulation.pe_cols", pe_cols, 2)  # a dense and a sparse engine
        if not 0 < theta < 1:
            raise BesaError(f"HardwareSimulation.theta={theta}: must be between 0 and 1 (the paper's 0.5)")
        positive("HardwareSimulation.theta_step", theta_step)
        at_least("HardwareSimulation.tries", tries, 1)
        at_least("HardwareSimulation.latency_seqlen", latency_seqlen, 1)
        self.acc = Accelerator(pe_rows, pe_cols, theta, theta_step, tries)
        self.measure_latency = measure_latency
        self.latency_seqlen = latency_seqlen

    def on_fit_end(self, trainer, pruner) -> None:
        if not trainer.is_global_zero:  # under DDP the evaluation runs once, on rank 0
            return
        source = pruner.open_source()
        table = simulate(source.linear_weights(source.evaluation_folder(trainer)), self.acc)
        results = {
            "accelerator": vars(self.acc) | {"dense_share_band": list(self.acc.dense_share_band)},
            "per_type": table,
        }
        view = Table(title=f"simulated accelerator ({self.acc.pe_rows}x{self.acc.pe_cols} PEs, cycles per layer)")
        for column in ("type", "sparsity", "dense cycles", "sparse cycles", "speed-up"):
            view.add_column(column, justify="right")
        for kind, row in table.items():
            view.add_row(
                kind,
                f"{row['sparsity']:.4f}",
                f"{row['dense_cycles']:.0f}",
                f"{row['sparse_cycles']:.0f}",
                f"{row['speedup']:.2f}x",
            )
        console.print(view)
        if self.measure_latency:
            results["measured"] = self._measure(pruner)
        pruner.results["hardware"] = results

    def _measure(self, pruner) -> dict:
        model, device = pruner.evaluation_model()
        if model is None:
            reason = "the model does not fit in this device's memory; latency is measured only for models that do"
            console.print(f"measured latency skipped: {reason}")
            return {"skipped": reason}
        name = (
            torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
        )
        seconds = forward_latency(model, self.latency_seqlen)
        measured = {
            "device": name,
            "forward_ms": seconds * 1e3,
            "seqlen": self.latency_seqlen,
            "note": "dense kernels: zeros are still multiplied, so a pruned model is no faster than dense here",
        }
        console.print(
            f"measured forward latency on {name}: {seconds * 1e3:.1f} ms for {self.latency_seqlen} tokens "
            "(dense kernels; pruning alone does not make this faster)"
        )
        reason = semi_structured_skip_reason(device)
        first = prunable_linears(decoder_blocks(model)[0]).values()
        if reason is None and not all(is_two_four(linear.weight) for linear in first):
            reason = "the model is not 2:4 sparse (prune with --model.structure 2:4)"
        if reason is None:
            measured["semi_structured"] = semi_structured_latency(model)
            for kind, row in measured["semi_structured"].items():
                if "skipped" in row:
                    console.print(f"2:4 kernel {kind}: skipped ({row['skipped']})")
                    continue
                console.print(
                    f"2:4 kernel {kind}: dense {row['dense_ms']:.3f} ms, sparse {row['sparse_ms']:.3f} ms, "
                    f"{row['speedup']:.2f}x"
                )
        else:
            measured["semi_structured_skipped"] = reason
            console.print(f"2:4 sparse-kernel latency skipped: {measured['semi_structured_skipped']}")
        return measured
