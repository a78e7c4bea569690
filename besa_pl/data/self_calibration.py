"""Calibration text the model writes itself (`--data.dataset self`): no data needed at all.

The recipe follows Williams, Chrysostomou & Aletras, "Self-calibration for language model
quantization and pruning" (NAACL 2025, section 3): every sample starts from the BOS token alone;
the first word is drawn from the model restricted to common English function words (their fix
for multilingual models drifting into other languages); then plain sampling, with a temperature
that moves linearly from `temperature[0]` to `temperature[1]` over the first `schedule_steps`
tokens (their main setting is 1.0 -> 1.0); a sample that ends early (EOS) is continued by a new
generation until it has `seqlen` tokens. Optionally (`filter_fraction`), as Ji et al. "Beware of
calibration data for pruning LLMs" (ICLR 2025) do, extra samples are generated and those with
the highest perplexity under the model are dropped.

Generation uses the KV cache and batches, on the Trainer's device, and a text that ends leaves its
batch at once (`sample_batch`); the token ids are cached per
model, recipe and seed, so a resumed run calibrates on exactly the same tokens.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from rich.progress import Progress

from besa_pl.atomic import atomic_file
from besa_pl.compat import kv_cache_keyword
from besa_pl.console import stage
from besa_pl.errors import BesaError, at_least
from besa_pl.models.memory import available_bytes
from besa_pl.offline import cache_dir

# Bumped whenever the same recipe and seed would write other tokens (2: finished texts leave the
# batch, `sample_batch`), so a cache of the old writer is never taken for the new one's text.
WRITER = 2

# Common English function words (a subset of spaCy's English stop words, which the paper uses).
FIRST_WORDS = (
    "the",
    "a",
    "an",
    "in",
    "on",
    "at",
    "of",
    "to",
    "for",
    "with",
    "by",
    "from",
    "as",
    "and",
    "but",
    "or",
    "if",
    "when",
    "while",
    "after",
    "before",
    "this",
    "that",
    "these",
    "those",
    "it",
    "he",
    "she",
    "they",
    "we",
    "i",
    "you",
    "there",
    "here",
    "what",
    "how",
    "why",
    "where",
    "one",
    "some",
    "many",
    "most",
    "all",
    "each",
    "every",
    "my",
    "our",
    "his",
    "her",
    "their",
    "its",
    "not",
    "no",
)


@dataclass(frozen=True)
class SelfRecipe:
    """How the model writes its calibration text (see the module docstring).

    Args:
        temperature: sampling temperature at the first token and after `schedule_steps` tokens.
        schedule_steps: tokens over which the temperature moves linearly between the two.
        top_p: nucleus sampling threshold (1 = plain sampling, the paper's setting).
        filter_fraction: share of extra samples generated and dropped for the highest perplexity (0 = none).
        batch_size: samples written at once; the text depends on it (the random draws are taken in
            batch order). None: the largest of 64, 32, ..., 1 (at most the sample count) whose KV
            cache takes at most a quarter of the free memory (on a 2-core CPU, the demo model's 64 x
            256 tokens took 150 s at 64 against 263 s at 16: `bench/self_calibration_speed.py`).
    """

    temperature: tuple[float, float] = (1.0, 1.0)
    schedule_steps: int = 10
    top_p: float = 1.0
    filter_fraction: float = 0.0
    batch_size: int | None = None

    def check(self) -> None:
        if min(self.temperature) <= 0:
            raise BesaError(f"data.generation.temperature={list(self.temperature)}: both temperatures must be positive")
        if not 0 < self.top_p <= 1:
            raise BesaError(f"data.generation.top_p={self.top_p}: must be in (0, 1]")
        if not 0 <= self.filter_fraction < 1:
            raise BesaError(
                f"data.generation.filter_fraction={self.filter_fraction}: must be in [0, 1) (0.2 drops the 20% "
                "of samples with the highest perplexity)"
            )
        if self.batch_size is not None:
            at_least("data.generation.batch_size", self.batch_size, 1)
        at_least("data.generation.schedule_steps", self.schedule_steps, 1)


def kv_cache_bytes(config, seqlen: int, dtype: torch.dtype) -> int:
    """Bytes of one text's KV cache at `seqlen` tokens: keys and values of every layer."""
    text = getattr(config, "text_config", None) or config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return 2 * text.num_hidden_layers * kv_heads * head_dim * seqlen * torch.finfo(dtype).bits // 8


def resolved_batch(recipe: SelfRecipe, config, count: int, seqlen: int, dtype: torch.dtype, free_bytes: int) -> int:
    """`recipe.batch_size`, or for None the largest power of two up to 64 (and up to `count`) whose
    KV caches fit in a quarter of `free_bytes`."""
    if recipe.batch_size is not None:
        return recipe.batch_size
    batch = 64
    while batch > 1 and (batch > count or batch * kv_cache_bytes(config, seqlen, dtype) > free_bytes // 4):
        batch //= 2
    return batch


def first_word_ids(tokenizer) -> list[int]:
    """Token ids that spell a listed word on their own (with and without a leading space)."""
    ids = set()
    for word in FIRST_WORDS:
        for text in (word, " " + word, word.capitalize(), " " + word.capitalize()):
            encoded = tokenizer(text, add_special_tokens=False).input_ids
            if len(encoded) == 1:
                ids.add(encoded[0])
    return sorted(ids)


class _Schedule:
    """The sampling rule at step `step` (0 = the first new token): the first token among `first_ids`;
    a linear temperature schedule; nucleus sampling when top_p < 1."""

    def __init__(self, first_ids: list[int], recipe: SelfRecipe) -> None:
        from transformers import TopPLogitsWarper

        self.first_ids = torch.tensor(first_ids)
        self.recipe = recipe
        self.top_p = TopPLogitsWarper(recipe.top_p) if recipe.top_p < 1 else None

    def __call__(self, step: int, scores: torch.Tensor) -> torch.Tensor:
        if step == 0 and self.first_ids.numel():
            allowed = torch.full_like(scores, float("-inf"))
            allowed[:, self.first_ids.to(scores.device)] = 0.0
            scores = scores + allowed
        t0, t1 = self.recipe.temperature
        temperature = t0 + min(step, self.recipe.schedule_steps) / self.recipe.schedule_steps * (t1 - t0)
        scores = scores / temperature
        return self.top_p(None, scores) if self.top_p is not None else scores


@torch.no_grad()
def sample_batch(model, bos: int, eos: int | None, count: int, steps: int, rule: _Schedule, device, on_step=None):
    """`count` texts of BOS and up to `steps` sampled tokens, written side by side with the KV cache.

    A text that draws EOS ends there (EOS kept) and leaves the batch at once, its rows dropped from
    the cache, so no step is spent on finished texts (`transformers`' generate keeps them until the
    longest one ends). No padding is ever needed: the texts still in the batch all have the same
    length. `on_step(alive, logits)` sees the rows still writing and their next-token logits."""
    from transformers import DynamicCache

    cache = {kv_cache_keyword(model): DynamicCache()}
    texts = [[bos] for _ in range(count)]
    alive = torch.arange(count, device=device)
    last = torch.full((count, 1), bos, dtype=torch.long, device=device)
    for step in range(steps):
        logits = model(input_ids=last, use_cache=True, **cache).logits[:, -1].float()
        if on_step is not None:
            on_step(alive, logits)
        probs = torch.softmax(rule(step, logits), dim=-1)
        drawn = torch.multinomial(probs, num_samples=1).view(-1)
        for row, token in zip(alive.tolist(), drawn.tolist()):
            texts[row].append(token)
        writing = drawn != eos if eos is not None else torch.ones_like(drawn, dtype=torch.bool)
        if not bool(writing.all()):
            if not bool(writing.any()):
                break
            kept = writing.nonzero().view(-1)
            next(iter(cache.values())).batch_select_indices(kept)
            alive, drawn = alive[kept], drawn[kept]
        last = drawn.view(-1, 1)
    return texts


@torch.no_grad()
def generate_samples(
    model,
    tokenizer,
    count: int,
    seqlen: int,
    recipe: SelfRecipe,
    device,
    progress=None,
    label: str = "calibration text",
) -> torch.Tensor:
    """`count` samples of exactly `seqlen` tokens (BOS first), written by the model."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    rule = _Schedule(first_word_ids(tokenizer), recipe)
    rows: list[list[int]] = [[] for _ in range(count)]
    task = progress.add_task("model writes its calibration text", total=count * seqlen) if progress else None
    while True:
        short = [i for i, row in enumerate(rows) if len(row) < seqlen]
        if not short:
            break
        for start in range(0, len(short), recipe.batch_size):
            batch = short[start : start + recipe.batch_size]
            need = max(seqlen - len(rows[i]) for i in batch)
            written = sum(len(row) for row in rows)
            steps = [0, written]

            def log_progress(alive, _logits, steps=steps):  # a line a minute or so, even in one wide batch
                steps[0] += 1
                steps[1] += len(alive)
                if steps[0] % 64 == 0:
                    stage(f"{label}: {min(steps[1], count * seqlen)}/{count * seqlen} tokens written")

            texts = sample_batch(model, bos, eos, len(batch), max(need - 1, 1), rule, device, log_progress)
            for row_index, text in zip(batch, texts):
                # a text that ended early (EOS) is continued by the next round's new generation
                before = len(rows[row_index])
                rows[row_index].extend(text[: seqlen - before])
                if progress:
                    progress.advance(task, len(rows[row_index]) - before)
            done = sum(len(row) == seqlen for row in rows)
            stage(f"{label}: {done}/{count} samples of {seqlen} tokens written")
    return torch.tensor(rows, dtype=torch.long)


@torch.no_grad()
def sample_perplexities(model, samples: torch.Tensor, device, batch_size: int) -> torch.Tensor:
    losses = []
    for start in range(0, samples.shape[0], batch_size):
        ids = samples[start : start + batch_size].to(device)
        logits = model(ids, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        losses.append(loss.mean(dim=1).exp().cpu())
    return torch.cat(losses)


def cache_path(model_fingerprint: str, nsamples: int, seqlen: int, seed: int, recipe: SelfRecipe) -> Path:
    key = json.dumps(
        {"model": model_fingerprint, "n": nsamples, "t": seqlen, "seed": seed, "writer": WRITER, **asdict(recipe)},
        sort_keys=True,
    )
    return cache_dir() / "self-calibration" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"


def self_calibration_tokens(
    source, nsamples: int, seqlen: int, seed: int, recipe: SelfRecipe, device, label: str = "calibration text"
) -> tuple[torch.Tensor, str]:
    """(N x T tokens, description): from the cache, or written by the model now (`label` names them in the log)."""
    recipe.check()
    count = math.ceil(nsamples / (1 - recipe.filter_fraction)) if recipe.filter_fraction else nsamples
    batch = resolved_batch(recipe, source.config, count, seqlen, source.dtype, available_bytes(device))
    recipe = replace(recipe, batch_size=batch)  # the text depends on it: part of the cache key
    path = cache_path(source.fingerprint, nsamples, seqlen, seed, recipe)
    described = (
        f"self-generated by the model (seed {seed}, temperature {recipe.temperature[0]}->{recipe.temperature[1]}"
        f", top-p {recipe.top_p}, filter {recipe.filter_fraction})"
    )
    if path.exists():
        return torch.load(path), described + f", cached at {path}"
    model, device = source.generation_model(device)
    stage(f"{label}: the model writes {count} samples of {seqlen} tokens, {batch} at a time (cached for later runs)")
    with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
        torch.manual_seed(seed)
        with Progress(transient=True) as progress:
            samples = generate_samples(model, source.tokenizer, count, seqlen, recipe, device, progress, label)
    if count > nsamples:  # keep the nsamples of lowest perplexity
        keep = torch.argsort(sample_perplexities(model, samples, device, recipe.batch_size), stable=True)[:nsamples]
        samples = samples[keep.sort().values]
    with atomic_file(path) as tmp:
        torch.save(samples, tmp)
    return samples, described
