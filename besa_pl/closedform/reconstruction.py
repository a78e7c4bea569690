"""Weight reconstruction of a block whose masks are final: the closed-form part of besa-pl.

BESA (Xu et al., ICLR 2024) learns only where to prune; the kept weights keep their dense values.
Here the kept weights are re-solved afterwards, sublayer by sublayer in the order the block uses
them ("true-sequential": q/k/v, then o, then gate/up, then down), each with the OBS sweep under its
fixed mask (`obs.obs_sweep`, SparseGPT's lazy-batch update; GPTQ's quantization with a grid).

Each linear's input Gram H = X X^T is taken on the pruned path: the block's inputs through the
sublayers already reconstructed. The target of each linear is chosen by `reference`:

- "layer": its own dense output on that input, W0 X (SparseGPT's update, applied to given masks);
- "target": its dense output in the reference forward that produced the block's training target
  (the dense block on the pruned inputs, or the dense model's trajectory), W0 X_ref, so a later
  sublayer also absorbs the error of the earlier ones (asymmetric calibration).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call

from besa_pl.closedform.gram import RunningGram
from besa_pl.closedform.mask_swaps import swap_refine
from besa_pl.closedform.masked_solve import masked_least_squares
from besa_pl.closedform.obs import (
    CountSelect,
    GroupSelect,
    LayerBudgetSelect,
    QuantGrid,
    RowBudgetSelect,
    least_squares_start,
    obs_sweep,
)
from besa_pl.models.loading import call_block, prunable_linears
from besa_pl.settings import PruneSettings

# How each `--model.reconstruct` value re-chooses the weights within the learned masks' counts.
SELECTIONS = {"obs_select": CountSelect, "obs_row": RowBudgetSelect, "obs_layer": LayerBudgetSelect}


class _Stop(Exception):
    """Ends a forward pass as soon as the inputs of the sublayer group being solved are recorded."""


@torch.no_grad()
def sequential_groups(block: nn.Module, hidden: Tensor, kwargs: dict) -> list[list[str]]:
    """The block's linears in call order, grouped by shared input (q/k/v; o; gate/up; down)."""
    linears = prunable_linears(block)
    # The inputs themselves are kept until the grouping is done: a freed input's memory could be
    # reused by a later one, and comparing addresses would then merge two groups (allocator-dependent,
    # so it could even differ between DDP ranks).
    order: list[tuple[str, Tensor]] = []
    handles = [
        linear.register_forward_pre_hook(lambda _m, args, name=name: order.append((name, args[0])))
        for name, linear in linears.items()
    ]
    try:
        call_block(block, hidden, kwargs)
    finally:
        for handle in handles:
            handle.remove()
    groups: list[list[str]] = []
    inputs: list[Tensor] = []
    for name, x in order:
        if any(name in group for group in groups):
            continue  # a linear called twice keeps its first place
        if inputs and inputs[-1] is x:
            groups[-1].append(name)
        else:
            groups.append([name])
            inputs.append(x)
    return groups


class _GroupInputs:
    """Records the (flattened, fp32) input of a sublayer group's first linear, then stops the pass."""

    def __init__(self, linear: nn.Linear) -> None:
        self.value: Tensor | None = None
        self._handle = linear.register_forward_pre_hook(self._hook)

    def _hook(self, _module, args) -> None:
        self.value = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        raise _Stop

    def take(self, run: Callable[[], None]) -> Tensor:
        self.value = None
        try:
            run()
        except _Stop:
            pass
        return self.value

    def remove(self) -> None:
        self._handle.remove()


@torch.no_grad()
def reconstruct_block(
    block: nn.Module,
    dense: dict[str, Tensor],
    masks: dict[str, Tensor],
    inputs: Tensor,
    reference_inputs: Tensor | None,
    kwargs: dict,
    device,
    settings: PruneSettings,
    grids: dict[str, QuantGrid] | None = None,
    log: Callable[[str], None] | None = None,
    column_weights: dict[str, Tensor] | None = None,
) -> dict[str, tuple[Tensor, Tensor]]:
    """Re-solve the kept weights of `block` in place, group by group, as `settings` say; returns
    (scale, zero) per linear when `grids` quantizes. `dense` holds W0 per linear, `masks` the final
    keep-masks; `reference_inputs` are the inputs of the reference forward (None = `inputs`).

    - `reconstruct_reference`: what each linear's output should match (module docstring);
    - `reconstruction` obs_select / obs_row / obs_layer: the masks give only how many weights each
      row prunes per column block / row / layer, and the sweep picks which (`masks` is updated in
      place); obs: the sweep keeps the masks; under N:M (`settings.nm`) obs_select keeps N of every
      M, the sweep choosing by saliency times `column_weights` (BESA's learned scales, if any), and
      the swaps stay inside each group;
    - `reconstruct_solve` exact: the kept weights are then solved to the optimum for the final mask
      (`masked_solve`) and the mask refined by up to `reconstruct_swaps` rounds of swaps inside each
      row (`mask_swaps`, counts unchanged); a quantizing grid is applied after that, by a second
      sweep under the mask;
    - `damping`: every sweep and solve damps the Gram by it x its mean diagonal."""
    reference, percdamp, swaps = settings.reconstruct_reference, settings.damping, settings.reconstruct_swaps
    reselect = SELECTIONS.get(settings.reconstruction)
    exact = settings.reconstruct_solve == "exact"
    linears = prunable_linears(block)
    for name, linear in linears.items():  # start from the masked dense weights
        linear.weight.copy_(
            (dense[name].to(linear.weight.device) * masks[name].to(linear.weight.device)).to(linear.weight.dtype)
        )
    reference_inputs = inputs if reference_inputs is None else reference_inputs
    dense_params = {f"{name}.weight": dense[name].to(device, linears[name].weight.dtype) for name in linears}
    qparams: dict[str, tuple[Tensor, Tensor]] = {}
    groups = sequential_groups(block, inputs[:1].to(device), kwargs)
    for group in groups:
        recorder = _GroupInputs(linears[group[0]])
        columns = linears[group[0]].in_features
        gram = RunningGram(columns, device)
        cross_gram = RunningGram(columns, device) if reference == "target" else None
        try:
            for i in range(inputs.shape[0]):
                hidden = inputs[i : i + 1].to(device)
                x = recorder.take(lambda: call_block(block, hidden, kwargs))  # noqa: B023 (called at once)
                gram.add(x)
                if cross_gram is not None:
                    ref_hidden = reference_inputs[i : i + 1].to(device)
                    x_ref = recorder.take(lambda: functional_call(block, dense_params, (ref_hidden,), kwargs))  # noqa: B023 (called at once)
                    cross_gram.add(x, x_left=x_ref)
        finally:
            recorder.remove()
        hessian = gram.combine_ranks()
        cross = cross_gram.combine_ranks() if cross_gram is not None else None
        if cross is not None and torch.equal(cross, hessian):
            cross = None  # same inputs on both paths (the first group): SparseGPT's own update
        for name in group:
            linear = linears[name]
            start = dense[name].to(device).float()
            if cross is not None:
                start = least_squares_start(start, hessian, cross, percdamp)
            mask = masks[name].to(device)
            if settings.nm is not None and reselect is not None:
                select = GroupSelect(*settings.nm, (column_weights or {}).get(name))
            else:
                select = reselect(mask) if reselect else None
            grid = (grids or {}).get(name)
            weight, keep, params = obs_sweep(
                start,
                hessian,
                keep=None if select else mask,
                select=select,
                grid=None if exact else grid,
                percdamp=percdamp,
                log=log,
            )
            if exact:
                weight = masked_least_squares(weight, start, hessian, keep, percdamp)
                if swaps:
                    group = settings.nm[1] if settings.nm is not None else None
                    weight, keep = swap_refine(weight, start, hessian, keep, swaps, percdamp, group=group)
                if grid is not None:  # the optimum's error is orthogonal to the mask: sweep from it
                    weight, keep, params = obs_sweep(weight, hessian, keep=keep, grid=grid, percdamp=percdamp, log=log)
            masks[name] = keep
            linear.weight.copy_((weight * keep).to(linear.weight.dtype))
            if params is not None:
                qparams[name] = (params[0].cpu(), params[1].cpu())
    return qparams
