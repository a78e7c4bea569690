"""Short hashes that tell whether a resumed run sees the same base model and calibration tokens."""

from __future__ import annotations

import hashlib

import torch


def tensor_fingerprint(tensor: torch.Tensor) -> str:
    """Short hash of a tensor's shape and values (the calibration tokens)."""
    digest = hashlib.sha256(f"{tuple(tensor.shape)}{tensor.dtype}".encode())
    digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def model_fingerprint(store) -> str:
    """Short hash of a model's weight files: every tensor's name, shape and dtype, and a sample of
    its values (the first and last row), read without loading the model."""
    digest = hashlib.sha256()
    for name, (shape, dtype, sample) in sorted(store.samples().items()):
        digest.update(f"{name}{shape}{dtype}".encode())
        digest.update(sample.to(torch.float64).numpy().tobytes())
    return digest.hexdigest()[:16]
