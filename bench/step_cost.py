"""Cost of one BESA training step on a demo-model block, against the floor.

The floor is what any method that backpropagates through the block must pay: forward and
backward of the frozen dense block with a trivial loss (gradient to the block input). A BESA
step adds the mask construction and the weight-gradient products the logits need.

    python bench/step_cost.py [--seqlen 2048] [--repeats 10] [--device cpu|cuda] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse

import torch

from besa_pl.besa.block import BESABlock
from besa_pl.eval.latency import seconds_per_call
from besa_pl.models.activations import capture_block_inputs, kwargs_to
from besa_pl.models.loading import decoder_blocks, load_model
from besa_pl.oneshot.importance import rank_linears, reference_pass
from besa_pl.settings import PruneSettings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--block", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()

    model, _ = load_model("demo", args.dtype)
    model.to(args.device)
    tokens = torch.randint(0, model.config.vocab_size, (1, args.seqlen), generator=torch.Generator().manual_seed(0))
    cache = capture_block_inputs(model, tokens, device=args.device)
    block = decoder_blocks(model)[args.block]
    kwargs = kwargs_to(cache.block_kwargs[args.block], args.device)
    x = cache.inputs[:1].to(args.device)

    def floor_step():
        inputs = x.detach().requires_grad_(True)
        out = block(inputs, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        out.float().pow(2).mean().backward()

    floor = seconds_per_call(floor_step, args.repeats, args.device, warmup=2)

    # The loop's own reference pass and ranking (besa_pl.oneshot.importance), then the real BESABlock step.
    target, stats = reference_pass(block, x, kwargs, args.device)
    ranks = rank_linears(block, stats, "wanda")
    besa = BESABlock(block, kwargs, ranks, PruneSettings())
    optimizer = besa.configure_optimizers()[0]

    def besa_step():
        optimizer.zero_grad()
        loss = besa.training_step((x, target))
        loss.backward()
        optimizer.step()

    step = seconds_per_call(besa_step, args.repeats, args.device, warmup=2)
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    trainable = sum(p.numel() for p in besa.parameters() if p.requires_grad)
    print(f"device: {name}; demo block {args.block}, {args.seqlen} tokens, {args.dtype}")
    print(f"trainable parameters (logits): {trainable:,}")
    print(f"floor (dense forward + backward to the input): {floor * 1e3:.1f} ms")
    print(f"BESA step (masks + forward + backward + Prodigy): {step * 1e3:.1f} ms")
    print(f"ratio: {step / floor:.2f}")


if __name__ == "__main__":
    main()
