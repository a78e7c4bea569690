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


@pytest.mark.parametrize(
    "extra,expected",
    [
        (["--model.sparsity", "1.2"], "model.sparsity=1.2: must be strictly between 0 and 1"),
        (["--model.sparsity", "0"], "model.sparsity=0.0: must be strictly between 0 and 1"),
        (["--data.seqlen", "1024"], "data.seqlen=1024 is longer than the model's context (512 tokens)"),
        (["--data.nsamples", "0"], "data.nsamples=0: must be at least 1"),
        (["--model.method", "prune-it"], "model.method=prune-it: unknown value; use one of besa, wanda"),
        (["--model.granularity", "column"], "model.granularity=column: unknown value; use one of row, layer"),
        (["--model.sparsity", "0.8", "--model.candidate_grid", "uniform"], "outside [0.376, 0.624]"),
    ],
)
def test_bad_settings(extra, expected, tiny_model_dir, calibration_text, tmp_path, capsys):
    line = run_failing(fit_args(tiny_model_dir("llama"), calibration_text, tmp_path, *extra), capsys)
    assert expected in line
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
