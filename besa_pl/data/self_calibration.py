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

Generation uses the KV cache and batches, on the Trainer's device; the token ids are cached per
model, recipe and seed, so a resumed run calibrates on exactly the same tokens.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.progress import Progress

from besa_pl.atomic import atomic_file
from besa_pl.console import stage
from besa_pl.errors import BesaError, at_least
from besa_pl.offline import cache_dir

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
        batch_size: samples generated at once (no effect on the text for a given seed and batch size).
    """

    temperature: tuple[float, float] = (1.0, 1.0)
    schedule_steps: int = 10
    top_p: float = 1.0
    filter_fraction: float = 0.0
    batch_size: int = 16

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
        at_least("data.generation.batch_size", self.batch_size, 1)
        at_least("data.generation.schedule_steps", self.schedule_steps, 1)


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
    """A logits processor: the first new token among `first_ids`; a linear temperature schedule."""

    def __init__(self, prompt_length: int, first_ids: list[int], recipe: SelfRecipe) -> None:
        self.prompt_length = prompt_length
        self.first_ids = torch.tensor(first_ids)
        self.recipe = recipe

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.prompt_length
        if step == 0 and self.first_ids.numel():
            allowed = torch.full_like(scores, float("-inf"))
            allowed[:, self.first_ids.to(scores.device)] = 0.0
            scores = scores + allowed
        t0, t1 = self.recipe.temperature
        temperature = t0 + min(step, self.recipe.schedule_steps) / self.recipe.schedule_steps * (t1 - t0)
        return scores / temperature


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
    from transformers import GenerationConfig, LogitsProcessorList

    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    first_ids = first_word_ids(tokenizer)
    rows: list[list[int]] = [[] for _ in range(count)]
    task = progress.add_task("model writes its calibration text", total=count * seqlen) if progress else None
    while True:
        short = [i for i, row in enumerate(rows) if len(row) < seqlen]
        if not short:
            break
        for start in range(0, len(short), recipe.batch_size):
            batch = short[start : start + recipe.batch_size]
            prompt = torch.full((len(batch), 1), bos, dtype=torch.long, device=device)
            need = max(seqlen - len(rows[i]) for i in batch)
            config = GenerationConfig(  # a fresh config: none of the model's own sampling defaults
                do_sample=True,
                top_p=recipe.top_p,
                top_k=0,
                temperature=1.0,
                max_new_tokens=max(need - 1, 1),
                min_new_tokens=1,
                eos_token_id=eos,
                pad_token_id=eos if eos is not None else bos,
                use_cache=True,
            )
            out = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                generation_config=config,
                logits_processor=LogitsProcessorList([_Schedule(1, first_ids, recipe)]),
            ).cpu()
            for row_index, sequence in zip(batch, out.tolist()):
                text = sequence[:1]
                for token in sequence[1:]:
                    text.append(token)
                    if token == eos:
                        break  # ended early: the next round appends a new generation
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
        {"model": model_fingerprint, "n": nsamples, "t": seqlen, "seed": seed, **asdict(recipe)}, sort_keys=True
    )
    return cache_dir() / "self-calibration" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"


def self_calibration_tokens(
    source, nsamples: int, seqlen: int, seed: int, recipe: SelfRecipe, device, label: str = "calibration text"
) -> tuple[torch.Tensor, str]:
    """(N x T tokens, description): from the cache, or written by the model now (`label` names them in the log)."""
    recipe.check()
    path = cache_path(source.fingerprint, nsamples, seqlen, seed, recipe)
    described = (
        f"self-generated by the model (seed {seed}, temperature {recipe.temperature[0]}->{recipe.temperature[1]}"
        f", top-p {recipe.top_p}, filter {recipe.filter_fraction})"
    )
    if path.exists():
        return torch.load(path), described + f", cached at {path}"
    model, device = source.generation_model(device)
    count = math.ceil(nsamples / (1 - recipe.filter_fraction)) if recipe.filter_fraction else nsamples
    stage(f"{label}: the model writes {count} samples of {seqlen} tokens (cached for later runs)")
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
