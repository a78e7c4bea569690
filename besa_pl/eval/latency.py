"""Measured speed, labelled honestly: forward latency on this machine, and 2:4 sparse kernels on GPUs."""

from __future__ import annotations

import time

import torch
from torch import nn

from besa_pl.models.loading import decoder_blocks, prunable_linears


def seconds_per_call(fn, repeats: int, device: torch.device | str, warmup: int = 1) -> float:
    """Mean wall time of fn() after warm-up, synchronising the GPU around the timed loop."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats


@torch.no_grad()
def forward_latency(model: nn.Module, seqlen: int = 128, repeats: int = 5) -> float:
    """Seconds for one batch-1 forward pass of `seqlen` tokens with the model's own (dense) kernels."""
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (1, seqlen), device=device)
    return seconds_per_call(lambda: model(ids, use_cache=False), repeats, device)


def semi_structured_skip_reason(device: torch.device) -> str | None:
    """Why the 2:4 sparse-kernel measurement cannot run on the Trainer's device, or None if it can."""
    if torch.device(device).type != "cuda":
        return "the Trainer's device is not a CUDA GPU: torch's 2:4 sparse kernels need one of compute capability 8.0+"
    major, _ = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"GPU compute capability {major}.x is below 8.0, which 2:4 sparse kernels need"
    return None


def is_two_four(weight: torch.Tensor) -> bool:
    groups = (weight != 0).reshape(weight.shape[0], -1, 4).sum(dim=-1)
    return bool((groups <= 2).all())


@torch.no_grad()
def semi_structured_latency(model: nn.Module, tokens: int = 2048, repeats: int = 20) -> dict:
    """Per projection type: dense matmul vs torch.sparse.to_sparse_semi_structured on the GPU (fp16)."""
    from torch.sparse import to_sparse_semi_structured

    results: dict[str, dict[str, float]] = {}
    block = decoder_blocks(model)[0]
    for name, linear in prunable_linears(block).items():
        weight = linear.weight.detach().to("cuda", torch.float16)
        if not is_two_four(weight):
            continue
        x = torch.randn(tokens, weight.shape[1], device="cuda", dtype=torch.float16)
        try:
            sparse = to_sparse_semi_structured(weight)
        except (RuntimeError, ValueError) as error:  # shape or kernel limits: report, do not fail the run
            results[name.split(".")[-1]] = {"skipped": f"{type(error).__name__}: {str(error)[:120]}"}
            continue
        dense_s = seconds_per_call(lambda: torch.nn.functional.linear(x, weight), repeats, "cuda")  # noqa: B023 (called at once)
        sparse_s = seconds_per_call(lambda: torch.nn.functional.linear(x, sparse), repeats, "cuda")  # noqa: B023 (called at once)
        results[name.split(".")[-1]] = {
            "dense_ms": dense_s * 1e3,
            "sparse_ms": sparse_s * 1e3,
            "speedup": dense_s / sparse_s,
        }
    return results
