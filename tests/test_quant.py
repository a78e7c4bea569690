"""Joint pruning + quantization with learnable clipping (BESA's joint compression)."""

import json

import numpy as np
import pytest
import torch

from besa_pl.quant.packed import load_packed, pack_bits, unpack_bits
from besa_pl.quant.quantizer import (
    LearnableClipQuantizer,
    apply_params,
    quant_params,
    rtn,
)

from .conftest import fit_args, run_cli, saved_weights


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [None, 8])
def test_quantized_weights_lie_on_their_group_grid(bits, group_size):
    weight = torch.randn(6, 32, generator=torch.Generator().manual_seed(bits))
    quantizer = LearnableClipQuantizer(weight.shape, bits, group_size)
    quantized = quantizer(weight).detach()
    scale, zero = quantizer.params(weight)
    size = group_size or 32
    grouped = quantized.reshape(6, 32 // size, size)
    codes = grouped / scale.unsqueeze(-1) + zero.unsqueeze(-1)
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert codes.round().min() >= 0 and codes.round().max() <= 2**bits - 1
    assert len(torch.unique(grouped[0, 0])) <= 2**bits


def test_at_init_with_sigmoid_one_it_is_plain_min_max_rtn():
    weight = torch.randn(8, 64)
    assert torch.equal(LearnableClipQuantizer(weight.shape, 4, 16, init=30.0)(weight), rtn(weight, 4, 16))
    # OmniQuant's init (sigmoid 0.982) clips slightly: a different grid, a similar error
    close = LearnableClipQuantizer(weight.shape, 4, 16)(weight).detach()
    plain = rtn(weight, 4, 16)
    assert not torch.equal(close, plain)
    assert (close - weight).pow(2).mean() < 1.5 * (plain - weight).pow(2).mean()


def test_clipping_logits_receive_gradients_and_zeros_survive():
    from torch.nn.utils import parametrize

    from besa_pl.besa.allocation import SparsityAllocation, candidate_rates
    from besa_pl.oneshot.importance import row_ranks

    linear = torch.nn.Linear(32, 8, bias=False)
    quantizer = LearnableClipQuantizer(linear.weight.shape, 4, 8)
    parametrize.register_parametrization(linear, "weight", quantizer)
    allocation = SparsityAllocation(row_ranks(torch.rand(8, 32)), candidate_rates(0.5))
    parametrize.register_parametrization(linear, "weight", allocation)
    out = linear(torch.randn(5, 32))
    out.pow(2).sum().backward()
    assert quantizer.clip_upper.grad is not None and quantizer.clip_upper.grad.abs().sum() > 0
    assert quantizer.clip_lower.grad is not None and quantizer.clip_lower.grad.abs().sum() > 0
    assert torch.all(linear.weight[~allocation.hard_mask()] == 0)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_unpack_bits_round_trips(bits):
    values = np.random.default_rng(bits).integers(0, 2**bits, size=1001)
    assert np.array_equal(unpack_bits(pack_bits(values, bits), bits, values.size), values)


def test_apply_params_is_idempotent():
    weight = torch.randn(4, 16)
    one = torch.ones(())
    scale, zero = quant_params(weight, 3, None, one, one)
    once = apply_params(weight, 3, None, scale, zero)
    assert torch.equal(apply_params(once, 3, None, scale, zero), once)


@pytest.mark.parametrize("method", ["besa", "wanda"])
def test_joint_fit_exports_packed_that_restores_exactly(method, tiny_model_dir, calibration_text, tmp_path):
    args = fit_args(
        tiny_model_dir("llama"),
        calibration_text,
        tmp_path,
        "--model.method",
        method,
        "--model.quant.bits",
        "4",
        "--model.quant.group_size",
        "16",
    )
    run_cli(args)
    report = json.loads((tmp_path / "sparsity.json").read_text())
    assert report["overall"] == pytest.approx(0.5, abs=0.02)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["bytes"]["packed"] < results["bytes"]["fp16"]
    exported = saved_weights(tmp_path / "pruned")
    restored, _ = load_packed(tmp_path / "packed")
    state = restored.state_dict()
    for name, tensor in exported.items():
        if "layers" in name and name.endswith("proj.weight"):
            assert torch.equal(state[name], tensor), name
            groups = tensor.reshape(tensor.shape[0], -1, 16)
            assert all(len(torch.unique(g)) <= 16 + 1 for g in groups.reshape(-1, 16))  # 16 levels (+ pruned 0)
    assert len(list((tmp_path / "packed").glob("model-*.safetensors"))) == 3 + 1  # a shard per block, then the rest
