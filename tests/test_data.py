"""The calibration samplers: the SparseGPT/Wanda document recipe and the resumable order."""

import random
from types import SimpleNamespace

import torch

from besa_pl.data.calibration import ResumableSampler, sample_documents


class WordTokenizer:
    """One token per word, a BOS (0) first, as a slow LLaMA tokenizer adds one."""

    def __call__(self, text, return_tensors=None):
        ids = [0] + [len(word) for word in text.split()]
        return SimpleNamespace(input_ids=torch.tensor([ids]))


def test_documents_longer_than_seqlen_give_one_random_window_each():
    docs = [" ".join("x" * (1 + i % 7) for i in range(n)) for n in (3, 40, 5, 60, 9, 80)]
    used = set()
    windows = sample_documents(docs, WordTokenizer(), nsamples=6, seqlen=10, seed=0, used=used)
    assert windows.shape == (6, 10)
    assert used <= {1, 3, 5}  # only documents with more than seqlen tokens (BOS included)
    for window in windows:
        assert any(_contains(WordTokenizer()(docs[i]).input_ids[0], window) for i in used)
    again = sample_documents(docs, WordTokenizer(), nsamples=6, seqlen=10, seed=0)
    other = sample_documents(docs, WordTokenizer(), nsamples=6, seqlen=10, seed=1)
    assert torch.equal(windows, again) and not torch.equal(windows, other)


def test_the_window_start_follows_the_seeded_recipe():
    docs = [" ".join("ab" for _ in range(50))]
    rng = random.Random(3)
    index = rng.randint(0, 0)
    start = rng.randint(0, 51 - 10 - 1)
    window = sample_documents(docs, WordTokenizer(), nsamples=1, seqlen=10, seed=3)[0]
    assert index == 0 and torch.equal(window, WordTokenizer()(docs[0]).input_ids[0][start : start + 10])


def _contains(ids, window):
    n = window.numel()
    return any(torch.equal(ids[i : i + n], window) for i in range(ids.numel() - n + 1))


def _sampler(restarting: bool, completed: int, batch_size: int):
    loop = SimpleNamespace(
        restarting=restarting,
        epoch_loop=SimpleNamespace(batch_progress=SimpleNamespace(current=SimpleNamespace(completed=completed))),
    )
    datamodule = SimpleNamespace(trainer=SimpleNamespace(fit_loop=loop))
    return ResumableSampler(10, datamodule, batch_size)


def test_resumable_sampler_starts_after_the_finished_steps():
    assert list(_sampler(False, 0, 1)) == list(range(10))
    assert list(_sampler(True, 3, 1)) == list(range(3, 10))
    assert list(_sampler(True, 2, 4)) == [8, 9]  # two micro-batches of four samples were done
