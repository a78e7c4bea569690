"""Every bad input ends with one clear line, a non-zero exit, no traceback and no finished-looking output."""

import json

import pytest
import torch
from lightning.pytorch import Callback

from .conftest import fit_args, run_cli


def run_failing(args, capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        run_cli(args)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def assert_nothing_finished(root):
    assert not (root / "sparsity.json").exists()
    assert not (root / "results.json").exists()
    assert not (root / "pruned").exists()


def callback_config(tmp_path, class_name: str, init_args: str) -> list[str]:
    path = tmp_path / "callback.yaml"
    path.write_text(f"trainer:\n  callbacks:\n    - class_path: besa_pl.callbacks.{class_name}\n"
                    f"      init_args: {init_args}\n")
    return ["--config", str(path)]


# Every setting, each with an invalid value, and the line it must end with.
BAD_SETTINGS = [
    (["--model.method", "prune-it"], "model.method=prune-it: unknown value; use one of besa, wanda"),
    (["--model.sparsity", "1.2"], "model.sparsity=1.2: must be strictly between 0 and 1"),
    (["--model.sparsity", "0"], "model.sparsity=0.0: must be strictly between 0 and 1"),
    (["--model.sparsity", "half"], "model.sparsity=half: expected float"),
    (["--model.granularity", "column"], "model.granularity=column: unknown value; use one of row, layer"),
    (["--model.structure", "2-4", "--model.method", "wanda"], "model.structure=2-4: write N:M"),
    (["--model.structure", "4:2", "--model.method", "wanda"], "model.structure=4:2: write N:M with 0 < N < M"),
    (["--model.structure", "2:4"], "N:M sparsity works with --model.method magnitude, wanda or sparsegpt, not besa"),
    (["--model.structure", "3:7", "--model.method", "wanda"], "not a multiple of 7"),
    (["--model.importance", "random"], "model.importance=random: unknown value; use one of wanda, magnitude, sparsegpt"),
    (["--model.smoothing", "maybe"], "model.smoothing=maybe: expected bool"),
    (["--model.smoothing_scale", "0"], "model.smoothing_scale=0.0: must be positive"),
    (["--model.candidate_grid", "log"], "model.candidate_grid=log: unknown value; use one of centered, uniform"),
    (["--model.sparsity", "0.8", "--model.candidate_grid", "uniform"], "outside [0.376, 0.624]"),
    (["--model.num_candidates", "1"], "model.num_candidates=1: must be at least 2"),
    (["--model.penalty_weight", "-1"], "model.penalty_weight=-1.0: must be at least 0"),
    (["--model.penalty_form", "squared"], "model.penalty_form=squared: unknown value; use one of relative, absolute"),
    (["--model.target_mode", "dense"], "model.target_mode=dense: unknown value; use one of pruned_input, dense_trajectory"),
    (["--model.optimizer", "sgd"], "model.optimizer=sgd: unknown value; use one of prodigy, adamw"),
    (["--model.lr", "0"], "model.lr=0.0: must be positive"),
    (["--model.d_coef", "-5"], "model.d_coef=-5.0: must be positive"),
    (["--model.epochs_per_block", "0"], "model.epochs_per_block=0: must be at least 1"),
    (["--model.reconstruct_swaps", "-1"], "model.reconstruct_swaps=-1: must be at least 0"),
    (["--model.percdamp", "0"], "model.percdamp=0.0: must be positive"),
    (["--model.dtype", "int8"], "model.dtype=int8: unknown value; use one of float32, bfloat16, float16"),
    (["--model.activation_dtype", "fp8"], "model.activation_dtype=fp8: unknown value; use one of float32"),
    (["--model.quant.bits", "5"], "model.quant.bits=5: use one of 2, 3, 4, 8"),
    (["--model.quant.group_size", "0", "--model.quant.bits", "4"], "model.quant.group_size=0: must be at least 1"),
    (["--model.quant.group_size", "48", "--model.quant.bits", "4"], "model.quant.group_size=48 does not divide"),
    (["--model.quant.clip_lr", "0", "--model.quant.bits", "4"], "model.quant.clip_lr=0.0: must be positive"),
    (["--model.exact_sparsity", "perhaps"], "model.exact_sparsity=perhaps: expected bool"),
    (["--model.reconstruct", "sgd"], "model.reconstruct=sgd: unknown value; use one of auto, none, obs, obs_select"),
    (["--model.reconstruct_reference", "block"], "model.reconstruct_reference=block: unknown value; use one of layer"),
    (["--data.nsamples", "0"], "data.nsamples=0: must be at least 1"),
    (["--data.seqlen", "1"], "data.seqlen=1: must be at least 2"),
    (["--data.seqlen", "1024"], "data.seqlen=1024 is longer than the model's context (512 tokens)"),
    (["--data.seed", "zero"], "data.seed=zero: expected int"),
    (["--data.batch_size", "0"], "data.batch_size=0: must be at least 1"),
    (["--data.data_dir", "/no/such/folder"], "data.data_dir=/no/such/folder: no such folder"),
    (["--data.generation.temperature", "[0, 1]"], "data.generation.temperature=[0.0, 1.0]: both temperatures must be positive"),
    (["--data.generation.top_p", "1.5"], "data.generation.top_p=1.5: must be in (0, 1]"),
    (["--data.generation.filter_fraction", "1"], "data.generation.filter_fraction=1.0: must be in [0, 1)"),
    (["--data.generation.batch_size", "0"], "data.generation.batch_size=0: must be at least 1"),
    (["--data.generation.schedule_steps", "0"], "data.generation.schedule_steps=0: must be at least 1"),
    (["--nonsense", "1"], "unknown setting --nonsense"),
    (["--overwrite", "often"], "overwrite=often: expected bool"),
]


@pytest.mark.parametrize("extra,expected", BAD_SETTINGS, ids=[" ".join(extra) for extra, _ in BAD_SETTINGS])
def test_bad_settings(extra, expected, tiny_model_dir, calibration_text, tmp_path, capsys):
    line = run_failing(fit_args(tiny_model_dir("llama"), calibration_text, tmp_path, *extra), capsys)
    assert expected in line, line
    assert_nothing_finished(tmp_path)


BAD_CALLBACK_ARGS = [
    ("PerplexityEval", "{datasets: [wikitext103]}", "PerplexityEval.datasets: unknown dataset 'wikitext103'"),
    ("PerplexityEval", "{seqlen: 1}", "PerplexityEval.seqlen=1: must be at least 2"),
    ("PerplexityEval", "{seqlen: 4096}", "PerplexityEval.seqlen=4096 is longer than the model's context (512)"),
    ("PerplexityEval", "{batch_size: 0}", "PerplexityEval.batch_size=0: must be at least 1"),
    ("PerplexityEval", "{max_windows: 0}", "PerplexityEval.max_windows=0: must be at least 1"),
    ("ZeroShotEval", "{tasks: [mmlu]}", "ZeroShotEval.tasks: unknown task(s) mmlu"),
    ("ZeroShotEval", "{limit: 0}", "ZeroShotEval.limit=0: must be at least 1"),
    ("ZeroShotEval", "{batch_size: 0}", "ZeroShotEval.batch_size=0: must be at least 1"),
    ("ZeroShotEval", "{max_length: 4}", "ZeroShotEval.max_length=4: must be at least 16"),
    ("HardwareSimulation", "{pe_rows: 0}", "HardwareSimulation.pe_rows=0: must be at least 1"),
    ("HardwareSimulation", "{pe_cols: 1}", "HardwareSimulation.pe_cols=1: must be at least 2"),
    ("HardwareSimulation", "{theta: 1.5}", "HardwareSimulation.theta=1.5: must be between 0 and 1"),
    ("HardwareSimulation", "{theta_step: 0}", "HardwareSimulation.theta_step=0.0: must be positive"),
    ("HardwareSimulation", "{tries: 0}", "HardwareSimulation.tries=0: must be at least 1"),
    ("HardwareSimulation", "{latency_seqlen: 0}", "HardwareSimulation.latency_seqlen=0: must be at least 1"),
]


@pytest.mark.parametrize("name,init_args,expected", BAD_CALLBACK_ARGS, ids=[f"{n} {a}" for n, a, _ in BAD_CALLBACK_ARGS])
def test_bad_evaluation_settings(name, init_args, expected, tiny_model_dir, calibration_text, tmp_path, capsys):
    args = fit_args(tiny_model_dir("llama"), calibration_text, tmp_path)
    line = run_failing(["fit", *callback_config(tmp_path, name, init_args), *args[1:]], capsys)
    assert expected in line, line
    assert_nothing_finished(tmp_path)


def test_unknown_dataset_name(tiny_model_dir, tmp_path, capsys):
    args = fit_args(tiny_model_dir("llama"), "wikitext103", tmp_path)
    assert "data.dataset=wikitext103: not c4, wikitext2, ptb, self or an existing .txt/.jsonl file" in run_failing(args, capsys)
    assert_nothing_finished(tmp_path)


def test_model_path_that_does_not_exist(calibration_text, tmp_path, capsys):
    line = run_failing(fit_args(tmp_path / "no-such-model", calibration_text, tmp_path / "run"), capsys)
    assert "no such file or folder" in line and "model.pretrained" in line


def test_model_family_without_decoder_blocks(calibration_text, tmp_path, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM

    from .conftest import tiny_tokenizer

    config = AutoConfig.for_model("bert", vocab_size=512, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, is_decoder=True)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "bert")
    tiny_tokenizer(tmp_path / "bert")
    line = run_failing(fit_args(tmp_path / "bert", calibration_text, tmp_path / "run"), capsys)
    assert "cannot find the decoder blocks of BertLMHeadModel" in line


def test_data_folder_without_the_needed_file(tiny_model_dir, tmp_path, capsys):
    args = fit_args(tiny_model_dir("llama"), "c4", tmp_path / "run", "--data.data_dir", str(tmp_path))
    line = run_failing(args, capsys)
    assert "has no c4 train split (expected c4/c4_sample.jsonl)" in line


def test_non_utf8_text_file(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 ".encode("latin-1") * 500)
    line = run_failing(fit_args(tiny_model_dir("llama"), bad, tmp_path / "run"), capsys)
    assert "not UTF-8 text" in line and "convert it to UTF-8" in line


def test_gguf_file_that_is_not_gguf(calibration_text, tmp_path, capsys):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf file")
    line = run_failing(fit_args(fake, calibration_text, tmp_path / "run"), capsys)
    assert "is not a GGUF file" in line


def test_output_folder_with_a_finished_run_is_refused(tiny_model_dir, calibration_text, tmp_path, capsys):
    args = fit_args(tiny_model_dir("llama"), calibration_text, tmp_path)
    run_cli(args)
    before = (tmp_path / "sparsity.json").read_text()
    line = run_failing(args, capsys)
    assert "already holds a finished run; pass --overwrite true" in line
    assert (tmp_path / "sparsity.json").read_text() == before
    run_cli(args + ["--overwrite", "true"])


class PoisonTargets(Callback):
    """Test helper: make block 1's reconstruction targets NaN, as a numerical blow-up would."""

    def on_train_epoch_start(self, trainer, pruner):
        if pruner.block_index == 1:
            pruner.cache.targets[0].fill_(float("nan"))


def test_nan_loss_stops_the_block_and_keeps_the_checkpoint(tiny_model_dir, calibration_text, tmp_path, capsys):
    config = tmp_path / "poison.yaml"
    config.write_text("trainer:\n  callbacks:\n    - class_path: tests.test_bad_input.PoisonTargets\n")
    args = fit_args(tiny_model_dir("llama"), calibration_text, tmp_path)
    line = run_failing(["fit", "--config", str(config), *args[1:]], capsys)
    assert "block 1: loss became nan at step 0" in line
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["besa"]["block_index"] == 1
    assert_nothing_finished(tmp_path)
    assert not json.dumps(checkpoint["besa"]["block_logs"]).count("nan")
