"""The accelerator cycle model on hand-made masks with known answers, and N:M masks."""

import json
import math

import pytest
import torch

from besa_pl.eval.hwsim import Accelerator, dense_cycles, matrix_cycles, split_cycles

from .conftest import fit_args, run_cli, saved_weights


@pytest.mark.parametrize("rows,cols", [(64, 64), (4096, 4096), (11008, 4096), (100, 37), (576, 1536), (192, 576)])
def test_fully_dense_is_ceil_rc_over_pe_count(rows, cols):
    assert dense_cycles(rows, cols) == math.ceil(rows * cols / (64 * 64))
    assert matrix_cycles(torch.ones(rows, cols, dtype=torch.bool)).cycles == math.ceil(rows * cols / 4096)


def test_llama7b_shapes_use_out_features_for_dense_work():
    assert dense_cycles(4096, 4096) == 4096
    assert dense_cycles(11008, 4096) == 11008  # gate/up: the original undercounted these
    assert dense_cycles(4096, 11008) == 4096 + 4096 + 2816  # down_proj in R x R patches


def test_all_sparse_columns_go_to_the_sparse_engine():
    mask = torch.zeros(128, 256, dtype=torch.bool)
    mask[::4] = True  # every column keeps 32 of 128 weights: below theta * rows
    result = matrix_cycles(mask)
    assert result.dense_columns == 0
    assert result.cycles == result.sparse_cycles == math.ceil(mask.sum().item() / (64 * 64))


def test_all_dense_columns_go_to_the_dense_engine():
    mask = torch.ones(128, 256, dtype=torch.bool)
    mask[0] = False  # 127 of 128 kept: every column dense
    result = matrix_cycles(mask)
    assert result.dense_columns == 256 and result.sparse_cycles == 0
    assert result.cycles == math.ceil(128 * 256 / 4096)


def test_mixed_columns_split_the_pe_array():
    mask = torch.zeros(128, 128, dtype=torch.bool)
    mask[:, :32] = True  # 32 dense columns: 4096 dense work
    mask[:8, 32:] = True  # 96 sparse columns with 8 weights: 768 sparse work
    result = matrix_cycles(mask)
    width_dense = math.floor(64 * 4096 / (4096 + 768))
    assert result.dense_columns == 32
    assert result.dense_cycles == math.ceil(4096 / (width_dense * 64))
    assert result.sparse_cycles == math.ceil(768 / ((64 - width_dense) * 64))
    assert result.cycles == max(result.dense_cycles, result.sparse_cycles)
    assert result.flops == 4096 + 768


def test_down_proj_patches_are_summed():
    mask = torch.rand(64, 200, generator=torch.Generator().manual_seed(0)) > 0.5
    patches = [mask[:, i : i + 64] for i in range(0, 200, 64)]
    assert [p.shape[1] for p in patches] == [64, 64, 64, 8]
    assert matrix_cycles(mask).cycles == sum(matrix_cycles(p).cycles for p in patches)


def test_threshold_adapts_until_the_dense_share_is_in_band():
    # 100 full columns, 150 columns with 270 of 512 rows kept, the rest with 40. At theta 0.5 the
    # 270-columns count as dense and the dense engine holds 91% of the kept weights (out of band):
    # 37 cycles. Theta rises to 0.6, they move to the sparse engine, the share (54%) is in band: 28.
    counts = torch.tensor([500] * 120 + [270] * 150 + [40] * 242)
    mask = torch.arange(512).view(-1, 1) < counts.view(1, -1)
    first, share = split_cycles(mask.sum(0), 512, 0.5, Accelerator())
    assert share > 0.6 and first.cycles == 37
    assert matrix_cycles(mask, Accelerator(tries=1)).cycles == 37
    adaptive = matrix_cycles(mask)
    assert adaptive.cycles == 28 and adaptive.dense_columns == 120


def test_no_dependence_on_column_ids_in_wide_matrices():
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(300, 260, generator=g) > torch.rand(1, 260, generator=g)
    permuted = mask[:, torch.randperm(260, generator=g)]
    assert matrix_cycles(mask) == matrix_cycles(permuted)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("structure", ["2:4", "4:8"])
def test_n_m_masks_keep_exactly_n_of_every_m(method, structure, tiny_model_dir, calibration_text, tmp_path):
    config = tmp_path / "hw.yaml"
    config.write_text("trainer:\n  callbacks:\n    - class_path: besa_pl.callbacks.HardwareSimulation\n")
    args = fit_args(
        tiny_model_dir("llama"), calibration_text, tmp_path, "--model.method", method, "--model.structure", structure
    )
    run_cli(["fit", "--config", str(config), *args[1:]])
    n, m = map(int, structure.split(":"))
    weights = saved_weights(tmp_path / "pruned")
    linears = [w for name, w in weights.items() if "layers" in name and name.endswith("proj.weight")]
    assert len(linears) == 21
    for weight in linears:
        groups = (weight != 0).reshape(weight.shape[0], -1, m).sum(dim=-1)
        assert torch.all(groups == n)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["target_sparsity"] == pytest.approx(1 - n / m)
    assert results["hardware"]["per_type"]["q"]["sparsity"] == pytest.approx(1 - n / m)
    measured = results["hardware"]["measured"]
    assert "CUDA" in measured["semi_structured_skipped"]  # the Trainer ran on the CPU, GPU or not
