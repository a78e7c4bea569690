"""Calibration data (the SparseGPT/Wanda recipe: 128 random windows of random C4 train documents,
seed 0) and the evaluation corpora.

The hub is the default source; a data folder laid out as the README describes (`data_dir` or the
environment variable BESA_DATA_DIR) replaces it offline.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from besa_pl.compat import (
    ResumableForLightning,
    data_unreachable_errors,
    steps_done_in_epoch,
)
from besa_pl.data.self_calibration import SelfRecipe, self_calibration_tokens
from besa_pl.errors import BesaError, at_least
from besa_pl.fingerprint import tensor_fingerprint
from besa_pl.offline import hub_reachable, resolve_data_dir
from besa_pl.preflight import check_before_fit

CALIBRATION_DATASETS = ("c4", "wikitext2", "ptb")

# Files inside a data folder (the layout the README describes).
LOCAL_FILES = {
    ("c4", "train"): "c4/c4_sample.jsonl",
    ("c4", "validation"): "c4/c4_validation_2k.parquet",
    ("wikitext2", "test"): "wikitext-2-raw/wiki.test.raw",
    ("wikitext2", "train"): "wikitext-2-raw/wiki.train.raw",
    ("ptb", "test"): "ptb/ptb.test.txt",
    ("ptb", "validation"): "ptb/ptb.valid.txt",
    ("ptb", "train"): "ptb/ptb.train.txt",
}


def read_text_file(path: Path, setting: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise BesaError(
            f"{setting}={path}: not UTF-8 text ({error.reason} at byte {error.start}); convert it to UTF-8"
        ) from error
    except OSError as error:
        raise BesaError(
            f"{setting}={path}: cannot read ({error.strerror}); check the path and its permissions"
        ) from error


def _local_file(name: str, split: str, data_dir: Path, setting: str) -> Path:
    relative = LOCAL_FILES.get((name, split))
    path = data_dir / relative if relative else None
    if path is None or not path.exists():
        raise BesaError(
            f"{setting}: the data folder {data_dir} has no {name} {split} split "
            f"(expected {relative}); add the file, pick another dataset, or unset data_dir/BESA_DATA_DIR to use the hub"
        )
    return path


def _hub(loader, setting: str):
    if not hub_reachable():
        # Only calibration can do without data; an evaluation just needs its files.
        alternative = ", or calibrate with --data.dataset self" if setting == "data.dataset" else ""
        raise BesaError(
            f"{setting}: the Hugging Face hub cannot be reached and no data folder is set; set "
            f"data.data_dir (or BESA_DATA_DIR) to a local data folder{alternative}"
        )
    try:
        return loader()
    except data_unreachable_errors() as error:  # offline, unknown or gated dataset, missing file
        first_line = (str(error).splitlines() or [""])[0][:160]
        raise BesaError(
            f"{setting}: could not load from the Hugging Face hub ({type(error).__name__}: {first_line}); "
            "set data_dir (or BESA_DATA_DIR) to a local data folder"
        ) from error


def documents(name: str, split: str, data_dir: str | None, setting: str = "data.dataset") -> tuple[list[str], str]:
    """The documents of a corpus split, and where they came from."""
    folder = resolve_data_dir(data_dir)
    if folder is not None:
        path = _local_file(name, split, folder, setting)
        if path.suffix == ".jsonl":
            lines = read_text_file(path, setting).splitlines()
            return [json.loads(line)["text"] for line in lines if line.strip()], str(path)
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path, columns=["text"]).column("text").to_pylist(), str(path)
        text = read_text_file(path, setting)
        if name == "wikitext2":
            # The HF rows are the file's lines with blank lines (a lone space) mapped to "".
            return [line if line.strip() else "" for line in text.splitlines(keepends=True)], str(path)
        return [line.strip() for line in text.splitlines()], str(path)
    from datasets import load_dataset

    if name == "c4":
        shard = "en/c4-train.00000-of-01024.json.gz" if split == "train" else "en/c4-validation.00000-of-00008.json.gz"
        data = _hub(lambda: load_dataset("allenai/c4", data_files={split: shard}, split=split), setting)
        return list(data["text"]), f"hub allenai/c4 {shard}"
    if name == "wikitext2":
        data = _hub(lambda: load_dataset("wikitext", "wikitext-2-raw-v1", split=split), setting)
        return list(data["text"]), f"hub wikitext-2-raw-v1 {split}"
    if name == "ptb":
        data = _hub(lambda: load_dataset("ptb_text_only", "penn_treebank", split=split), setting)
        return list(data["sentence"]), f"hub ptb_text_only {split}"
    raise BesaError(f"{setting}={name}: unknown dataset; use c4, wikitext2, ptb or a path to a .txt/.jsonl file")


def sample_documents(
    docs: list[str], tokenizer, nsamples: int, seqlen: int, seed: int, used: set[int] | None = None
) -> torch.Tensor:
    """The SparseGPT/Wanda recipe: random documents longer than seqlen, one random window each.
    The indices of the documents drawn are added to `used`."""
    rng = random.Random(seed)
    windows = []
    attempts = 0
    while len(windows) < nsamples:
        attempts += 1
        if attempts > 200 * nsamples + 10_000:
            raise BesaError(
                f"data.seqlen={seqlen}: too few calibration documents are longer than {seqlen} tokens; lower data.seqlen"
            )
        index = rng.randint(0, len(docs) - 1)
        ids = tokenizer(docs[index], return_tensors="pt").input_ids[0]
        if ids.numel() <= seqlen:
            continue
        start = rng.randint(0, ids.numel() - seqlen - 1)
        windows.append(ids[start : start + seqlen])
        if used is not None:
            used.add(index)
    return torch.stack(windows)


def sample_stream(text: str, tokenizer, nsamples: int, seqlen: int, seed: int, setting: str) -> torch.Tensor:
    """Random windows of one tokenised text (for user files whose documents may be short)."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if ids.numel() <= seqlen:
        raise BesaError(
            f"{setting}: the text has {ids.numel()} tokens, not more than data.seqlen={seqlen}; lower data.seqlen or add text"
        )
    rng = random.Random(seed)
    starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([ids[s : s + seqlen] for s in starts])


def calibration_tokens(
    dataset: str, tokenizer, nsamples: int, seqlen: int, seed: int, data_dir: str | None, used: set[int] | None = None
):
    """(N x T token tensor, description of the source); C4 documents drawn are added to `used`."""
    if dataset in CALIBRATION_DATASETS:
        docs, source = documents(dataset, "train", data_dir)
        if dataset == "c4":
            return sample_documents(docs, tokenizer, nsamples, seqlen, seed, used), source
        return sample_stream("\n\n".join(docs), tokenizer, nsamples, seqlen, seed, "data.dataset"), source
    path = Path(dataset).expanduser()
    if not path.is_file():
        raise BesaError(f"data.dataset={dataset}: not c4, wikitext2, ptb, self or an existing .txt/.jsonl file")
    text = read_text_file(path, "data.dataset")
    if path.suffix == ".jsonl":
        try:
            text = "\n\n".join(json.loads(line)["text"] for line in text.splitlines() if line.strip())
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise BesaError(
                f"data.dataset={dataset}: every line must be a JSON object with a 'text' field ({error})"
            ) from error
    return sample_stream(text, tokenizer, nsamples, seqlen, seed, "data.dataset"), str(path)


class ResumableSampler(Sampler[int]):
    """Sample indices in order; after a mid-epoch resume it starts at the first unfinished one.

    Lightning restores its own count of finished batches; the sampler reads it, so the
    optimizer sees exactly the steps an uninterrupted run would.
    """

    def __init__(self, size: int, datamodule: CalibrationDataModule, batch_size: int = 1) -> None:
        self.size = size
        self.datamodule = datamodule
        self.batch_size = batch_size

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        trainer = self.datamodule.trainer
        start = steps_done_in_epoch(trainer) * self.batch_size if trainer is not None else 0
        return iter(range(start, self.size))


class ResumableLoader(ResumableForLightning, DataLoader):
    """A DataLoader that Lightning treats as resumable (its position lives in the fit loop)."""


class CalibrationDataModule(L.LightningDataModule):
    """Draws the calibration windows; the training 'batches' are sample indices into them.

    Args:
        dataset: c4 | wikitext2 | ptb | self (the model writes its own; no data needed) | a .txt / .jsonl file.
        nsamples, seqlen, seed: the calibration windows (the SparseGPT/Wanda recipe).
        data_dir: local data folder; None = the hub (or BESA_DATA_DIR).
        batch_size: calibration samples per BESA optimizer step (1 in the paper).
        generation: how the model writes its text with `dataset: self` (temperature schedule, top-p,
            perplexity filter, batch size; see besa_pl/data/self_calibration.py).
    """

    def __init__(
        self,
        dataset: str = "c4",
        nsamples: int = 128,
        seqlen: int = 2048,
        seed: int = 0,
        data_dir: str | None = None,
        batch_size: int = 1,
        generation: SelfRecipe = SelfRecipe(),
    ) -> None:
        super().__init__()
        at_least("data.nsamples", nsamples, 1)
        at_least("data.seqlen", seqlen, 2)
        at_least("data.batch_size", batch_size, 1)
        if data_dir is not None and not Path(data_dir).expanduser().is_dir():
            raise BesaError(
                f"data.data_dir={data_dir}: no such folder; give a folder laid out like the README's data "
                "folder, or leave it unset to use the Hugging Face hub"
            )
        generation.check()
        self.dataset = dataset
        self.nsamples = nsamples
        self.seqlen = seqlen
        self.seed = seed
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.generation = generation
        self.tokens: torch.Tensor | None = None
        self.fingerprint: str | None = None
        self.used_documents: set[int] | None = None
        self.source = ""

    def setup(self, stage: str) -> None:
        if self.tokens is not None:
            return
        pruner = self.trainer.lightning_module
        if not pruner.settings.pruning:
            return  # the dense row needs no calibration data
        limit = pruner.context_length()
        if limit is not None and self.seqlen > limit:
            raise BesaError(
                f"data.seqlen={self.seqlen} is longer than the model's context ({limit} tokens); lower data.seqlen"
            )
        ranks = self.trainer.world_size
        if self.nsamples % ranks:
            raise BesaError(
                f"data.nsamples={self.nsamples} does not split over {ranks} ranks; use a multiple of {ranks}"
            )
        # The first hook of a fit: the Python API refuses what the command refuses, before any work.
        check_before_fit(self.trainer, pruner, self)
        if self.dataset == "self":
            device = self.trainer.strategy.root_device
            if self.trainer.global_rank != 0:  # rank 0 writes the text into the cache, the others read it
                self.trainer.strategy.barrier("self-calibration")
            tokens, self.source = self_calibration_tokens(
                pruner.open_source(), self.nsamples, self.seqlen, self.seed, self.generation, device
            )
            if self.trainer.global_rank == 0:
                self.trainer.strategy.barrier("self-calibration")
        else:
            self.used_documents = set()
            tokens, self.source = calibration_tokens(
                self.dataset,
                pruner.tokenizer,
                self.nsamples,
                self.seqlen,
                self.seed,
                self.data_dir,
                self.used_documents,
            )
        self.fingerprint = tensor_fingerprint(tokens)  # of all ranks' samples
        # Under DDP each rank keeps every ranks-th sample: rank r's step k is sample k * ranks + r, as
        # in one process with ranks times the micro-batch.
        self.tokens = tokens[self.trainer.global_rank :: ranks]

    def heldout_text(self, tokenizer) -> tuple[str, str]:
        """The calibration source's documents that calibration did not draw, joined with a space (as
        the C4 perplexity protocol joins documents): a validation split for choosing settings
        without touching the test sets."""
        if self.dataset != "c4":
            raise BesaError(
                f"PerplexityEval.datasets: heldout needs data.dataset c4 (documents to hold out), not {self.dataset}"
            )
        if self.used_documents is None:
            self.used_documents = set()
            calibration_tokens(
                self.dataset, tokenizer, self.nsamples, self.seqlen, self.seed, self.data_dir, self.used_documents
            )
        docs, source = documents("c4", "train", self.data_dir)
        kept = [doc for index, doc in enumerate(docs) if index not in self.used_documents]
        return " ".join(kept), f"{source} without the {len(self.used_documents)} calibration documents"

    def train_dataloader(self) -> DataLoader:
        count = self.tokens.shape[0] if self.tokens is not None else 0  # this rank's share (none: dense)
        return ResumableLoader(
            list(range(count)), batch_size=self.batch_size, sampler=ResumableSampler(count, self, self.batch_size)
        )
