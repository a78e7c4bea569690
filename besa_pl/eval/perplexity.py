"""PerplexityEval: the perplexity protocol of SparseGPT, Wanda and BESA, run at fit end.

Windows of 2048 tokens that do not overlap, the tail dropped; WikiText2 test rows joined with
"\n\n", PTB test sentences with " ", the first 1100 C4 validation documents with " " (256 windows).
For choosing settings without touching a test set: `heldout` (calibration documents not drawn) and
`ptb-valid` (PTB's validation sentences, joined like its test set: held-out text of another domain).
"""

from __future__ import annotations

import math

import torch
from lightning.pytorch import Callback
from torchmetrics.text import Perplexity

from besa_pl.console import console, stage
from besa_pl.data.calibration import documents
from besa_pl.errors import BesaError, at_least
from besa_pl.models.activations import capture_block_inputs, head_logits, run_block
from besa_pl.models.weights import WeightStore

PAPER_SEQLEN = 2048
C4_DOCUMENTS = 1100
C4_WINDOWS = 256


DATASETS = ("wikitext2", "c4", "ptb", "heldout", "ptb-valid")


def evaluation_text(name: str, data_dir: str | None, datamodule=None, tokenizer=None) -> tuple[str, str]:
    """The corpus text exactly as the protocol joins it, and its source."""
    if name == "heldout":
        return datamodule.heldout_text(tokenizer)
    if name == "wikitext2":
        docs, source = documents("wikitext2", "test", data_dir, "PerplexityEval.datasets")
        return "\n\n".join(docs), source
    if name in ("ptb", "ptb-valid"):
        docs, source = documents("ptb", "test" if name == "ptb" else "validation", data_dir, "PerplexityEval.datasets")
        return " ".join(docs), source
    if name == "c4":
        docs, source = documents("c4", "validation", data_dir, "PerplexityEval.datasets")
        if source.endswith(".parquet"):
            source += " (local C4 validation excerpt standing in for shard 00000)"
        return " ".join(docs[:C4_DOCUMENTS]), source
    raise BesaError(f"PerplexityEval.datasets: unknown dataset {name!r}; use {', '.join(DATASETS)}")


def windows(token_ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of seqlen tokens; the tail that does not fill a window is dropped."""
    count = token_ids.numel() // seqlen
    if max_windows is not None:
        count = min(count, max_windows)
    return token_ids[: count * seqlen].view(count, seqlen)


def _score(metric: Perplexity, per_window: list[float] | None, logits: torch.Tensor, ids: torch.Tensor) -> None:
    """Add a batch of windows to the metric one window at a time: the fp32 copies of the logits
    (softmax, log-softmax) then cover one window, not the batch; with a 262k-token vocabulary
    (Gemma-3) four windows' copies exceed 20 GB. Also records each window's mean next-token loss,
    so the perplexity of any first-k windows can be read later."""
    for row in range(logits.shape[0]):
        window_logits, targets = logits[row : row + 1, :-1].float(), ids[row : row + 1, 1:]
        metric.update(window_logits, targets)
        if per_window is not None:
            per_window.append(torch.nn.functional.cross_entropy(window_logits[0], targets[0]).item())


@torch.no_grad()
def perplexity(
    model, batches: torch.Tensor, batch_size: int = 1, device=None, per_window: list[float] | None = None
) -> float:
    """exp of the mean next-token loss; every window has seqlen-1 targets, so this equals
    exp(mean over windows of the per-window mean loss)."""
    device = device or next(model.parameters()).device
    metric = Perplexity().to(device)
    for start in range(0, batches.shape[0], batch_size):
        ids = batches[start : start + batch_size].to(device)
        _score(metric, per_window, model(ids, use_cache=False).logits, ids)
    return float(metric.compute())


@torch.no_grad()
def streamed_perplexity(
    source, folder, batches: torch.Tensor, device, batch_size: int = 1, per_window: list[float] | None = None
) -> float:
    """The same perplexity with only one block in memory: every window goes through block 0, then
    all of them through block 1, and so on (as SparseGPT's evaluation streams layers); the model's
    own head (final norm, LM head, any logit soft-capping) then scores the last hidden states."""
    store = WeightStore(folder)
    cache = capture_block_inputs(source.model, batches, device="cpu")
    hidden = cache.inputs
    for index in range(source.num_blocks):
        block = source.load_block(index, device, store)
        run_block(block, hidden, cache.block_kwargs[index], device, out=hidden, batch_size=batch_size)
        source.release_block(index)
    metric = Perplexity().to(device)
    source.move_outer(device)
    try:
        for start in range(0, batches.shape[0], batch_size):
            ids = batches[start : start + batch_size].to(device)
            _score(
                metric, per_window, head_logits(source.model, ids, hidden[start : start + batch_size].to(device)), ids
            )
    finally:
        source.move_outer("cpu")
    return float(metric.compute())


class PerplexityEval(Callback):
    """Perplexity of the (pruned) model on WikiText2 / C4 / PTB after pruning.

    Args:
        datasets: any of wikitext2, c4, ptb, and, for choosing settings, heldout (the calibration
            source's documents that calibration did not draw) and ptb-valid (PTB's validation split).
        seqlen: window length (2048, the BESA protocol).
        batch_size: windows per forward pass (no effect on the result).
        max_windows: evaluate only the first N windows (quick runs; the table says so).
        data_dir: local data folder; else the data module's, else BESA_DATA_DIR, else the hub.
        streaming: evaluate one block at a time over all windows even when the model fits (it always
            does so when the model is larger than the device's memory).
    """

    def __init__(
        self,
        datasets: list[str] = ("wikitext2",),
        seqlen: int = PAPER_SEQLEN,
        batch_size: int = 1,
        max_windows: int | None = None,
        data_dir: str | None = None,
        streaming: bool = False,
    ) -> None:
        for name in datasets:
            if name not in DATASETS:
                raise BesaError(f"PerplexityEval.datasets: unknown dataset {name!r}; use {', '.join(DATASETS)}")
        at_least("PerplexityEval.seqlen", seqlen, 2)
        at_least("PerplexityEval.batch_size", batch_size, 1)
        at_least("PerplexityEval.max_windows", max_windows, 1)
        self.datasets = list(datasets)
        self.seqlen = seqlen
        self.batch_size = batch_size
        self.max_windows = max_windows
        self.data_dir = data_dir
        self.streaming = streaming

    def setup(self, trainer, pruner, stage: str) -> None:
        limit = pruner.context_length()
        if limit is not None and self.seqlen > limit:
            raise BesaError(
                f"PerplexityEval.seqlen={self.seqlen} is longer than the model's context ({limit}); lower it"
            )
        if self.seqlen != PAPER_SEQLEN:
            console.print(
                f"[yellow]note:[/] perplexity at seqlen {self.seqlen}; BESA and SparseGPT report 2048, while Wanda's "
                "LLaMA-2 table used 4096: compare only numbers measured at the same length"
            )

    def on_fit_end(self, trainer, pruner) -> None:
        if not trainer.is_global_zero:  # under DDP the evaluation runs once, on rank 0
            return
        data_dir = self.data_dir or getattr(trainer.datamodule, "data_dir", None)
        scores, details, skipped = {}, {}, {}
        for name in self.datasets:
            try:
                text, source = evaluation_text(name, data_dir, trainer.datamodule, pruner.tokenizer)
            except BesaError as error:  # no data for it here: the pruning is done, so report and go on
                skipped[name] = str(error)
                console.print(f"[yellow]perplexity {name} skipped:[/] {error}")
                continue
            ids = pruner.tokenizer(text, return_tensors="pt").input_ids[0]
            limit = C4_WINDOWS if name in ("c4", "heldout") else None
            if self.max_windows is not None:
                limit = min(limit or self.max_windows, self.max_windows)
            batches = windows(ids, self.seqlen, limit)
            if batches.shape[0] == 0:
                raise BesaError(f"PerplexityEval.seqlen={self.seqlen}: {name} has only {ids.numel()} tokens; lower it")
            stage(f"evaluation: perplexity {name} on {batches.shape[0]} windows of {self.seqlen}")
            model, device = pruner.evaluation_model()
            per_window: list[float] = []
            if model is not None and not self.streaming:
                value = perplexity(model, batches, self.batch_size, device, per_window)
            else:  # larger than the device, or asked for: one block at a time over all windows
                source_model = pruner.open_source()
                value = streamed_perplexity(
                    source_model, source_model.evaluation_folder(trainer), batches, device, self.batch_size, per_window
                )
            scores[name] = value
            details[name] = {
                "windows": batches.shape[0],
                "tokens": ids.numel(),
                "seqlen": self.seqlen,
                "source": source,
                "all_windows": self.max_windows is None or batches.shape[0] == ids.numel() // self.seqlen,
                "window_loss": per_window,
            }
            console.print(f"perplexity {name}: {value:.3f} ({batches.shape[0]} windows of {self.seqlen}, {source})")
            if not math.isfinite(value):
                console.print(f"[yellow]warning:[/] {name} perplexity is not finite")
        pruner.results.setdefault("perplexity", {}).update(scores)
        pruner.results.setdefault("perplexity_details", {}).update(details)
        if skipped:
            pruner.results.setdefault("perplexity_skipped", {}).update(skipped)
        if trainer.logger is not None:
            trainer.logger.log_metrics({f"ppl/{k}": v for k, v in scores.items()})
