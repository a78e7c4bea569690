"""The compressed-tensors export: round trips through plain `AutoModelForCausalLM.from_pretrained`.

A tiny Llama is pruned by magnitude (half of every block linear) and quantized with besa-pl's own
quantizer functions the way a BESA run burns its blocks in: scale and zero point from the dense
weight with clipping, then W <- Q(W) * keep. The pruned folder holds those dequantized weights,
as the run's pruned/ does.

Tolerances. The format stores the scales in the model's dtype (what a loader casts them to), and
dequantizes as (q - zp) * scale. In float32 that is besa-pl's own arithmetic, so weights and logits
are bit-equal. In float16/bfloat16 the only difference is the scale's rounding to that dtype: the
loaded weights equal, bit for bit, besa-pl's codes dequantized with the rounded scales (checked
exactly, and then the logits of that model exactly), each weight is within |u - z| * |h_dtype - h|
plus one rounding of pruned/'s weight, and the logits stay within 4 machine epsilons of the dtype,
relative to the largest logit, of pruned/'s (the scale's relative error is at most eps/2, and the
tiny model's three blocks amplify that little; measured: about 1.2 eps).
"""

from __future__ import annotations

import json

import pytest
import torch

from besa_pl.errors import BesaError
from besa_pl.models.loading import prunable_linears
from besa_pl.quant.compressed_export import (
    check_export,
    folder_bytes,
    read_packed_qparams,
    write_compressed,
)
from besa_pl.quant.packed import PackedWriter
from besa_pl.quant.quantizer import (
    QuantConfig,
    burn_in,
    dequantize,
    quant_params,
    quantize_codes,
)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def make_pruned(dense, folder, dtype=torch.float32, quant: QuantConfig | None = None, packed=None):
    """Half of every block linear pruned by magnitude (and quantized with clipping); saved to
    `folder`, optionally with the run's packed/ form. Returns ({layer: keep}, {layer: (scale, zero)})."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(dense, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(dense)
    writer = PackedWriter(packed, len(model.model.layers) + 1, quant) if packed is not None else None
    masks, qparams = {}, {}
    with torch.no_grad():
        for index, block in enumerate(model.model.layers):
            prefix = f"model.layers.{index}."
            block_masks, block_qparams = {}, {}
            for name, linear in prunable_linears(block).items():
                weight = linear.weight
                keep = weight.abs() > weight.abs().flatten().kthvalue(weight.numel() // 2).values
                scale = zero = None
                if quant is not None:
                    groups = 1 if quant.group_size is None else weight.shape[1] // quant.group_size
                    # learned clipping strengths, as sigmoid(logits) near OmniQuant's init
                    gamma = torch.sigmoid(torch.empty(weight.shape[0], groups).uniform_(1.5, 4.0))
                    delta = torch.sigmoid(torch.empty(weight.shape[0], groups).uniform_(1.5, 4.0))
                    scale, zero = quant_params(weight, quant.bits, quant.group_size, gamma, delta)
                    block_qparams[name] = qparams[prefix + name] = (scale, zero)
                burn_in(weight, keep, quant or QuantConfig(), scale, zero)
                block_masks[name] = masks[prefix + name] = keep
            if writer is not None:
                writer.write_block(index, block, prefix, block_masks, block_qparams)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if writer is not None:
        outer = {k: v for k, v in model.state_dict().items() if not k.startswith("model.layers.")}
        writer.finish(outer, model.config, tokenizer, dtype)
    return masks, qparams


def load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


@torch.no_grad()
def logits(model, ids):
    return model(ids).logits


def ids():
    return torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(0))


def linear_weights(model):
    return {
        name + ".weight": m.weight
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and ".layers." in name
    }


def one_line_error(excinfo, *words):
    message = str(excinfo.value)
    assert "\n" not in message
    for word in words:
        assert word in message
    return message


def test_4bit_sparse_float32_from_packed_folder_is_bit_equal(tiny_model_dir, tmp_path):
    dense = tiny_model_dir("llama")
    quant = QuantConfig(bits=4, group_size=16)
    masks, _ = make_pruned(dense, tmp_path / "pruned", torch.float32, quant, packed=tmp_path / "packed")

    # The quantization parameters come from the run's packed/ folder beside pruned/.
    result = write_compressed(tmp_path / "pruned", tmp_path / "compressed", quant)

    assert result.folder == tmp_path / "compressed" and result.bytes == folder_bytes(result.folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compressed", "packed", "pruned"]  # no staging left
    config = json.loads((result.folder / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert config["quantization_status"] == "compressed" and config["ignore"] == ["lm_head"]
    weights = config["config_groups"]["group_0"]["weights"]
    fields = (weights["num_bits"], weights["strategy"], weights["group_size"], weights["symmetric"])
    assert fields == (4, "group", 16, False)
    assert config["sparsity_config"]["global_sparsity"] == pytest.approx(result.sparsity)
    assert 0.49 < result.sparsity <= 0.5

    pruned, exported = load(tmp_path / "pruned"), load(result.folder)
    assert torch.equal(logits(exported, ids()), logits(pruned, ids()))
    want, got = linear_weights(pruned), linear_weights(exported)
    for name, weight in want.items():
        assert torch.equal(got[name], weight), name
        assert torch.equal(got[name] != 0, masks[name.removesuffix(".weight")]), name  # the mask survives
    assert not any(isinstance(v, torch.Tensor) and v.dtype == torch.int32 for v in exported.state_dict().values())

    from transformers import AutoTokenizer

    text = "a b c"
    assert (
        AutoTokenizer.from_pretrained(result.folder)(text)["input_ids"]
        == AutoTokenizer.from_pretrained(dense)(text)["input_ids"]
    )
    if (tmp_path / "pruned" / "generation_config.json").exists():
        assert (result.folder / "generation_config.json").exists()
    assert result.bytes < folder_bytes(dense) and result.bytes < folder_bytes(tmp_path / "pruned")
    print(
        f"\nsizes (float32): dense {folder_bytes(dense):,} B, pruned {folder_bytes(tmp_path / 'pruned'):,} B, "
        f"packed {folder_bytes(tmp_path / 'packed'):,} B, compressed-tensors W4 g16 {result.bytes:,} B"
    )


@pytest.mark.parametrize("dtype,group_size", [("float16", None), ("bfloat16", 16)])
def test_4bit_sparse_half_precision_within_scale_rounding(tiny_model_dir, tmp_path, dtype, group_size):
    dense = tiny_model_dir("llama")
    torch_dtype = DTYPES[dtype]
    quant = QuantConfig(bits=4, group_size=group_size)
    masks, qparams = make_pruned(dense, tmp_path / "pruned", torch_dtype, quant)

    result = write_compressed(tmp_path / "pruned", tmp_path / "compressed", quant, qparams)

    config = json.loads((result.folder / "config.json").read_text())["quantization_config"]
    strategy = config["config_groups"]["group_0"]["weights"]["strategy"]
    assert strategy == ("channel" if group_size is None else "group")
    pruned, exported = load(tmp_path / "pruned"), load(result.folder)
    assert exported.dtype == torch_dtype
    eps = torch.finfo(torch_dtype).eps
    want, got = linear_weights(pruned), linear_weights(exported)
    emulated = {}
    for name, weight in want.items():
        layer = name.removesuffix(".weight")
        scale, zero = qparams[layer]
        codes = quantize_codes(weight.float(), quant.bits, group_size, scale, zero)
        rounded = scale.to(torch_dtype).float()
        # (q - zp) * scale in the dtype: one rounding of an exact float32 product
        emulated[name] = dequantize(codes, rounded, zero, weight.shape).to(torch_dtype)
        assert torch.equal(got[name], emulated[name]), name
        assert torch.equal(got[name] != 0, masks[layer]), name  # the mask survives
        steps = (codes - zero.unsqueeze(-1)).abs().reshape(weight.shape)
        scale_error = (rounded - scale).abs().repeat_interleave(weight.shape[1] // scale.shape[1], dim=1)
        bound = steps * scale_error + eps * weight.float().abs()
        assert ((got[name].float() - weight.float()).abs() <= bound).all(), name

    # The exported model is exactly pruned/ with its scales rounded to the dtype ...
    with torch.no_grad():
        for name, weight in want.items():
            weight.copy_(emulated[name])
    assert torch.equal(logits(exported, ids()), logits(pruned, ids()))
    # ... which moves the logits by a few epsilons of the dtype.
    reference = logits(load(tmp_path / "pruned"), ids()).float()
    difference = (logits(exported, ids()).float() - reference).abs().max()
    assert difference <= 4 * eps * reference.abs().max()

    dense_bytes, pruned_bytes = folder_bytes(dense), folder_bytes(tmp_path / "pruned")
    assert result.bytes < pruned_bytes < dense_bytes
    print(
        f"\nsizes ({dtype}, group {group_size}): dense float32 {dense_bytes:,} B, pruned {pruned_bytes:,} B, "
        f"compressed-tensors W4 {result.bytes:,} B; logits max diff {difference.item():.3g} "
        f"({difference.item() / reference.abs().max().item() / eps:.2f} eps of the largest logit)"
    )


def test_sparse_only_is_refused_in_one_line(tiny_model_dir, tmp_path):
    make_pruned(tiny_model_dir("llama"), tmp_path / "pruned")
    with pytest.raises(BesaError) as excinfo:
        write_compressed(tmp_path / "pruned", tmp_path / "compressed")
    one_line_error(excinfo, "CompressedTensorsExport", "model.quant.bits", "sparse-bitmask")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]
    with pytest.raises(BesaError):  # the same check, for the settings, before any pruning
        check_export(QuantConfig())
    check_export(QuantConfig(bits=4, group_size=128))


def test_unrepresentable_zero_point_is_refused_in_one_line(tiny_model_dir, tmp_path):
    quant = QuantConfig(bits=4, group_size=16)
    _, qparams = make_pruned(tiny_model_dir("llama"), tmp_path / "pruned", torch.float32, quant)
    layer = "model.layers.1.mlp.up_proj"
    scale, zero = qparams[layer]
    zero = zero.clone()
    zero[3, 1] = -2  # a group whose weights would all be positive
    with pytest.raises(BesaError) as excinfo:
        write_compressed(tmp_path / "pruned", tmp_path / "compressed", quant, {**qparams, layer: (scale, zero)})
    one_line_error(excinfo, "CompressedTensorsExport", layer, "[0, 15]")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]


def test_group_size_and_stale_parameters_are_refused(tiny_model_dir, tmp_path):
    quant = QuantConfig(bits=4, group_size=16)
    _, qparams = make_pruned(tiny_model_dir("llama"), tmp_path / "pruned", torch.float32, quant)

    with pytest.raises(BesaError) as excinfo:
        write_compressed(tmp_path / "pruned", tmp_path / "out", QuantConfig(bits=4, group_size=48), qparams)
    one_line_error(excinfo, "model.quant.group_size=48", "divides")
    with pytest.raises(BesaError) as excinfo:
        write_compressed(tmp_path / "pruned", tmp_path / "out", QuantConfig(bits=4, group_size=32), qparams)
    one_line_error(excinfo, "model.quant.group_size=32")
    stale = {name: (scale * 1.5, zero) for name, (scale, zero) in qparams.items()}
    with pytest.raises(BesaError) as excinfo:
        write_compressed(tmp_path / "pruned", tmp_path / "out", quant, stale)
    one_line_error(excinfo, "do not reproduce")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]


def test_packed_folder_parameters_round_trip(tiny_model_dir, tmp_path):
    quant = QuantConfig(bits=4, group_size=32)
    dense = tiny_model_dir("llama")
    _, qparams = make_pruned(dense, tmp_path / "pruned", torch.float32, quant, packed=tmp_path / "packed")
    read_quant, read = read_packed_qparams(tmp_path / "packed")
    assert (read_quant.bits, read_quant.group_size) == (4, 32)
    assert read.keys() == qparams.keys()
    for name, (scale, zero) in qparams.items():
        assert torch.equal(read[name][0], scale.float()) and torch.equal(read[name][1].float(), zero)
    with pytest.raises(BesaError) as excinfo:
        write_compressed(tmp_path / "pruned", tmp_path / "out", QuantConfig(bits=8, group_size=32))
    one_line_error(excinfo, "model.quant.bits=8", "packed")


def test_a_run_with_the_callback_leaves_a_compressed_folder_that_loads_with_the_pruned_logits(
    tiny_model_dir, tmp_path, monkeypatch
):
    from transformers import AutoModelForCausalLM

    from .conftest import fit_args, run_cli

    monkeypatch.setenv("BESA_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "run"
    run_cli(
        [
            *fit_args(
                tiny_model_dir("llama"),
                "self",
                root,
                "--model.method",
                "wanda",
                "--model.quant.bits",
                "4",
                "--model.quant.group_size",
                "16",
            ),
            "--trainer.callbacks+=besa_pl.callbacks.CompressedTensorsExport",
        ]
    )
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        pruned = AutoModelForCausalLM.from_pretrained(root / "pruned").eval()(ids, use_cache=False).logits
        compressed = AutoModelForCausalLM.from_pretrained(root / "compressed").eval()(ids, use_cache=False).logits
    assert torch.equal(pruned, compressed)  # float32: the format's arithmetic is besa-pl's own
    results = json.loads((root / "results.json").read_text())
    assert results["bytes"]["compressed"] == folder_bytes(root / "compressed") < folder_bytes(root / "pruned")


def test_the_callback_refuses_a_run_without_quantization_before_pruning(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from .conftest import fit_args, run_cli

    monkeypatch.setenv("BESA_CACHE", str(tmp_path / "cache"))
    with pytest.raises(SystemExit):
        run_cli(
            [
                *fit_args(tiny_model_dir("llama"), "self", tmp_path / "run", "--model.method", "wanda"),
                "--trainer.callbacks+=besa_pl.callbacks.CompressedTensorsExport",
            ]
        )
    assert "CompressedTensorsExport needs model.quant.bits" in capsys.readouterr().err
    assert not (tmp_path / "run" / "pruned").exists()
