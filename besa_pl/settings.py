"""Every result-changing pruning setting, as one typed, validated, frozen object.

The CLI exposes them as `--model.<name>`; BESABlock, the allocation, the loss and the loop read
them by name, never by position. Each invalid value ends the run with one line that names the
setting and the fix (`BesaError`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin, get_type_hints

from besa_pl.besa.allocation import candidate_rates, smoothing_band
from besa_pl.errors import BesaError, at_least, positive
from besa_pl.quant.quantizer import SUPPORTED_BITS, QuantConfig

Method = Literal["besa", "wanda", "sparsegpt", "magnitude", "dense"]
Granularity = Literal["row", "layer"]
Importance = Literal["wanda", "magnitude", "sparsegpt"]
CandidateGrid = Literal["centered", "uniform"]
PenaltyForm = Literal["relative", "absolute"]
TargetMode = Literal["pruned_input", "dense_trajectory"]
OptimizerName = Literal["prodigy", "adamw"]
DType = Literal["float32", "bfloat16", "float16"]
Reconstruct = Literal["auto", "none", "obs", "obs_select", "obs_row", "obs_layer"]
Reference = Literal["layer", "target"]
Solve = Literal["sweep", "exact"]

SPARSEGPT_DAMPING = 0.01  # SparseGPT's published damping
RECONSTRUCTION_DAMPING = 0.1  # the reconstruction's up to LIGHT_SPARSITY: see PruneSettings.damping
LIGHT_SPARSITY = 0.6  # chosen on held-out text at 50%, 60%, 70% and 2:4 (bench/selection.py)


def auto_damping(method: str, target: float) -> float:
    if method == "sparsegpt" or target > LIGHT_SPARSITY:
        return SPARSEGPT_DAMPING
    return RECONSTRUCTION_DAMPING


def parse_structure(structure: str | None) -> tuple[int, int] | None:
    """'2:4' -> (2, 4): keep N of every M consecutive input weights; None = unstructured."""
    if structure in (None, "", "unstructured"):
        return None
    try:
        n, m = (int(part) for part in structure.split(":"))
    except ValueError as error:
        raise BesaError(f"model.structure={structure}: write N:M with N < M, e.g. 2:4") from error
    if not 0 < n < m:
        raise BesaError(f"model.structure={structure}: write N:M with 0 < N < M, e.g. 2:4")
    return n, m


@dataclass(frozen=True)
class PruneSettings:
    """The settings of one pruning run; the CLI shows each as `--model.<name>`.

    Args:
        method: besa | wanda | sparsegpt | magnitude | dense (no pruning: the dense row).
        sparsity: target unstructured sparsity s*, 0 < s < 1.
        granularity: row (one allocation per output row, the paper) | layer (one per layer).
        structure: N:M semi-structured sparsity such as "2:4": every group of M consecutive inputs of a
            row keeps N weights. With besa, a learned scale per input channel re-ranks the importance
            scores inside each group (`besa/channel_scales.py`) instead of learning rates.
        nm_temperature: with besa and N:M, the width (in log-score units) of the soft mask whose
            gradient trains the channel scales (straight-through; the forward mask is the hard top N).
        nm_lr: with besa and N:M, AdamW's learning rate for the channel scales (log units per step at
            most, about); Prodigy is not used for them: the hard mask's loss is piecewise constant and
            Prodigy's step estimate grows without bound on it. 0.003 was chosen over 0.01 on held-out
            text (bench/selection.py --decisions nm_lr; the two within 0.5% of each other).
        importance: ranking metric BESA learns over: wanda (default) | magnitude | sparsegpt.
        smoothing: softmax(sigmoid(logits)) as in the official code; false = softmax(logits).
        smoothing_scale: s in softmax(s * sigmoid(z)); 1 = the official code, whose rates stay within
            about +/-12% of the grid's centre; larger s lets them move further.
        candidate_grid: centered (grid centred at the target; = the official grid at 0.5) | uniform.
        num_candidates: number of candidate rates (101 in the official code).
        penalty_weight: lambda of the sparsity penalty (5).
        penalty_form: relative ((s-s*)/s*)^2, the code | absolute (s-s*)^2, the paper.
        target_mode: pruned_input (dense block on pruned inputs, the code) | dense_trajectory
            (the dense model's own activations, the paper's Algorithm 1).
        optimizer: prodigy (default) | adamw.
        lr: learning rate of the logits: 1.0 for prodigy, ~1e-2 for adamw.
        d_coef: Prodigy's d_coef (5 for 7B/13B row-wise in the paper).
        epochs_per_block: passes over the calibration samples per block (1).
        dtype: weights' dtype: float32 | bfloat16 | float16.
        activation_dtype: dtype of the stored activations (None = dtype); bfloat16 halves their memory.
        quant: joint weight quantization (`--model.quant.bits 4 --model.quant.group_size 128`).
        exact_sparsity: shift a block's learned rates by one common amount so it ends exactly at the
            target; false = the official code's floor(C * alpha) (about 0.3% below the target).
        reconstruct: what happens to the kept weights once a block's masks are learned, sublayer by
            sublayer with SparseGPT's OBS sweep: auto (obs_select after BESA, obs after BESA under N:M,
            none after the one-shot methods) | none (the paper: they keep their dense values) | obs (update under the masks) |
            obs_select (the masks' counts per row and 128-column block; the sweep picks which weights)
            | obs_row (per-row counts) | obs_layer (per-layer counts). Under N:M, obs_select keeps N of
            every M, the sweep's saliency times BESA's learned channel scales, and obs keeps the masks.
        reconstruct_reference: layer (each linear keeps its own dense output on its pruned-path input,
            SparseGPT's objective) | target (each linear matches its output in the forward that made
            the block's target: the asymmetric form).
        reconstruct_solve: exact (after the sweep, the kept weights are solved to the optimum for the
            final mask: masked least squares per row, Boza 2024) | sweep (as the OBS sweep leaves
            them: SparseGPT's update, which never moves a kept weight left of a pruned one).
        reconstruct_swaps: with the exact solve, up to this many rounds of swaps of a pruned and a
            kept weight inside each row, scored by the exact change of the least-squares error and
            kept only where the error falls (DSnoT-style; row counts unchanged); the rounds stop once
            one lowers a layer's error by under 0.1%; 0 = off.
        percdamp: SparseGPT's damping, lambda = percdamp x the mean diagonal of each input Gram, in
            every OBS sweep and solve; larger values keep the kept weights closer to their dense
            values. None (default): 0.01 for the SparseGPT baseline (as published); for the
            reconstruction 0.1 up to 60% sparsity (2:4 included) and 0.01 above, chosen on held-out
            text only (C4 train documents calibration did not draw and PTB validation, demo model,
            one calibration draw): 0.1 won at 50% and 60% (at 2:4 a tie), 0.01 at 70%.
    """

    method: Method = "besa"
    sparsity: float = 0.5
    granularity: Granularity = "row"
    structure: str | None = None
    nm_temperature: float = 1.0
    nm_lr: float = 0.003
    importance: Importance = "wanda"
    smoothing: bool = True
    smoothing_scale: float = 1.0
    candidate_grid: CandidateGrid = "centered"
    num_candidates: int = 101
    penalty_weight: float = 5.0
    penalty_form: PenaltyForm = "relative"
    target_mode: TargetMode = "pruned_input"
    optimizer: OptimizerName = "prodigy"
    lr: float = 1.0
    d_coef: float = 5.0
    epochs_per_block: int = 1
    dtype: DType = "float32"
    activation_dtype: DType | None = None
    quant: QuantConfig = field(default_factory=QuantConfig)
    exact_sparsity: bool = True
    reconstruct: Reconstruct = "auto"
    reconstruct_reference: Reference = "layer"
    reconstruct_solve: Solve = "exact"
    reconstruct_swaps: int = 10
    percdamp: float | None = None

    def __post_init__(self) -> None:
        for name, hint in get_type_hints(type(self)).items():
            allowed = _choices(hint)
            value = getattr(self, name)
            if allowed and value not in allowed:
                shown = ", ".join(str(choice) for choice in allowed if choice is not None)
                raise BesaError(f"model.{name}={value}: unknown value; use one of {shown}")
        if not 0.0 < self.sparsity < 1.0:
            raise BesaError(f"model.sparsity={self.sparsity}: must be strictly between 0 and 1 (e.g. 0.5)")
        at_least("model.num_candidates", self.num_candidates, 2)
        at_least("model.epochs_per_block", self.epochs_per_block, 1)
        at_least("model.reconstruct_swaps", self.reconstruct_swaps, 0)
        for name in ("smoothing_scale", "lr", "d_coef", "nm_temperature", "nm_lr"):
            positive(f"model.{name}", getattr(self, name))
        if self.percdamp is not None:
            positive("model.percdamp", self.percdamp)
        at_least("model.penalty_weight", self.penalty_weight, 0)
        if self.method == "besa" and self.smoothing and self.nm is None:
            low, high = smoothing_band(
                candidate_rates(self.sparsity, self.num_candidates, self.candidate_grid), self.smoothing_scale
            )
            if not low + 0.01 <= self.sparsity <= high - 0.01:
                raise BesaError(
                    f"model.sparsity={self.sparsity} is outside [{low:.3f}, {high:.3f}], what sigmoid smoothing can reach "
                    f"on the {self.candidate_grid} grid; use --model.candidate_grid centered, a larger "
                    "--model.smoothing_scale or --model.smoothing false"
                )
        if self.nm is not None and self.reconstruction in ("obs_row", "obs_layer"):
            raise BesaError(
                f"model.reconstruct={self.reconstruct}: per-row or per-layer counts break model.structure "
                f"{self.structure}; use obs_select or obs"
            )
        quant = self.quant
        if quant.enabled and quant.bits not in SUPPORTED_BITS:
            raise BesaError(f"model.quant.bits={quant.bits}: use one of {', '.join(map(str, SUPPORTED_BITS))}")
        at_least("model.quant.group_size", quant.group_size, 1)
        positive("model.quant.clip_lr", quant.clip_lr)

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_structure(self.structure)

    @property
    def target(self) -> float:
        """s*, or 1 - N/M under N:M structure (which decides the rate by itself)."""
        return 1.0 - self.nm[0] / self.nm[1] if self.nm else self.sparsity

    @property
    def pruning(self) -> bool:
        return self.method != "dense"

    @property
    def reconstruction(self) -> str:
        """`reconstruct` with `auto` resolved: obs_select after BESA (obs under N:M), none after the
        one-shot methods (so `--model.method wanda` is Wanda as published)."""
        if self.reconstruct == "auto":
            if self.method != "besa":
                return "none"
            # under N:M the learned masks are kept: on held-out text re-choosing them by the sweep's
            # saliency (times the learned scales) did worse (bench/results/selection.md)
            return "obs" if self.nm is not None else "obs_select"
        return self.reconstruct

    @property
    def damping(self) -> float:
        """`percdamp` with None resolved: SparseGPT's published 0.01 for `--model.method sparsegpt`; for
        the reconstruction after the other methods 0.1 up to 60% sparsity and 0.01 above (chosen on
        held-out text, see the `percdamp` setting: at 50-60% the extra damping keeps the re-solved
        weights a little closer to their dense values; at 70% it holds back the larger moves they need)."""
        return self.percdamp if self.percdamp is not None else auto_damping(self.method, self.target)

    @property
    def importance_damping(self) -> float:
        """The damping of `--model.importance sparsegpt`: `percdamp` when given, else SparseGPT's 0.01
        (the reconstruction's rule is for re-solving weights, not for ranking them)."""
        return self.percdamp if self.percdamp is not None else SPARSEGPT_DAMPING

    @property
    def dense_trajectory(self) -> bool:
        return self.target_mode == "dense_trajectory"

    @property
    def needs_hessian(self) -> bool:
        return self.method == "sparsegpt" or (self.method == "besa" and self.importance == "sparsegpt")

    def variant(self) -> str:
        """In words, which method ran (the results table's first row)."""
        names = {"besa": "BESA", "wanda": "Wanda", "sparsegpt": "SparseGPT", "magnitude": "magnitude", "dense": "dense"}
        text = names[self.method]
        if self.nm is not None:
            text += f" {self.structure}" + (" (learned channel scales)" if self.method == "besa" else "")
        if self.method == "besa" and self.reconstruction == "none" and self.nm is not None:
            text += ", no reconstruction"
        elif self.method == "besa" and self.reconstruction == "none":
            text += " (the paper's: no reconstruction" + (", official floor rule)" if not self.exact_sparsity else ")")
        elif self.reconstruction != "none" and self.pruning:
            how = {
                "obs": "OBS update under its masks",
                "obs_select": "SparseGPT's sweep choosing within its counts per row and column block",
                "obs_row": "SparseGPT's sweep choosing within its per-row counts",
                "obs_layer": "SparseGPT's sweep choosing within its per-layer counts",
            }[self.reconstruction]
            if self.nm is not None and self.reconstruction == "obs_select":
                how = "SparseGPT's sweep choosing N of every M" + (
                    ", saliency times the learned scales" if self.method == "besa" else ""
                )
            solve = ", masked least squares" if self.reconstruct_solve == "exact" else ""
            if self.reconstruct_solve == "exact" and self.reconstruct_swaps:
                solve += f", {self.reconstruct_swaps} rounds of swaps"
            text += f" + {how} ({self.reconstruct_reference} reference{solve})"
        uses_damping = self.pruning and (self.method == "sparsegpt" or self.reconstruction != "none")
        if uses_damping and self.damping != auto_damping(self.method, self.target):
            text += f", percdamp {self.damping:g}"
        if self.quant.enabled:
            text += f", {self.quant.bits}-bit weights"
        return text

    def flat(self) -> dict[str, Any]:
        """`model.<name>` -> value, the quantization settings as `model.quant.<name>`."""
        values = {}
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if dataclasses.is_dataclass(value):
                values.update({f"model.{item.name}.{k}": v for k, v in dataclasses.asdict(value).items()})
            else:
                values[f"model.{item.name}"] = value
        values["model.percdamp"] = self.damping  # the damping that ran: resume compares it with a checkpoint's
        return values


def _choices(hint) -> tuple | None:
    """The allowed values of a Literal (or Literal | None) type hint; None for other types."""
    if get_origin(hint) is Literal:
        return get_args(hint)
    literals = [arg for arg in get_args(hint) if get_origin(arg) is Literal]
    return get_args(literals[0]) + (None,) if literals else None
