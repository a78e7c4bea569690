"""Fault injection: damaged model files, unwritable folders, oversized settings and kills.

Each error ends in one line that names the setting and the fix, and no fault leaves anything
finished-looking behind (no `pruned/`, no `sparsity.json`, no `results.json`).
"""

import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from lightning.pytorch import Callback

from besa_pl.errors import BesaError
from besa_pl.preflight import INDEX_FILE, activation_bytes, check_weight_files

from .conftest import REPO, fit_args, run_cli


def failing_line(args, capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        run_cli(args)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return " ".join(lines[0].split())


def assert_nothing_finished(root: Path) -> None:
    for name in ("pruned", "packed", "sparsity.json", "results.json"):
        assert not (root / name).exists(), name


# ------------------------------------------------------------------ damaged weight files
@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    """A copy of the tiny model folder to damage."""
    return Path(shutil.copytree(tiny_model_dir("llama"), tmp_path / "model"))


@pytest.fixture
def sharded_model(tiny_model_dir, tmp_path):
    """The tiny model saved in several shards with an index."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path / "sharded"
    source = tiny_model_dir("llama")
    AutoModelForCausalLM.from_pretrained(source).save_pretrained(folder, max_shard_size="100KB")
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    assert (folder / INDEX_FILE).exists()
    return folder


def weights_file(folder: Path) -> Path:
    return max(folder.glob("*.safetensors"))


def truncate(folder: Path) -> str:
    path = weights_file(folder)
    path.write_bytes(path.read_bytes()[:-1000])
    return "is truncated"


def cut_inside_header(folder: Path) -> str:
    path = weights_file(folder)
    path.write_bytes(path.read_bytes()[:40])
    return "is truncated"


def empty(folder: Path) -> str:
    weights_file(folder).write_bytes(b"")
    return "is truncated"


def corrupt_header(folder: Path) -> str:
    path = weights_file(folder)
    data = bytearray(path.read_bytes())
    data[9:60] = b"\xff" * 51
    path.write_bytes(bytes(data))
    return "has a corrupt header"


def wrong_offsets(folder: Path) -> str:
    """A header that parses but whose offsets disagree with a tensor's shape."""
    path = weights_file(folder)
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    name = next(key for key in header if key != "__metadata__")
    header[name]["shape"] = [dim * 2 for dim in header[name]["shape"]]
    raw = json.dumps(header, separators=(",", ":")).encode().ljust(length)
    assert len(raw) == length
    path.write_bytes(data[:8] + raw + data[8 + length :])
    return "has a corrupt header"


def not_safetensors(folder: Path) -> str:
    path = weights_file(folder)
    path.write_bytes(b"\xff" * 64 + path.read_bytes()[64:])
    return "is not a safetensors file"


DAMAGE = {
    "truncated": truncate,
    "cut inside the header": cut_inside_header,
    "empty": empty,
    "corrupt header": corrupt_header,
    "offsets disagree with the shape": wrong_offsets,
    "not safetensors": not_safetensors,
}


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_a_damaged_weights_file_is_named(damage, model_copy):
    expected = damage(model_copy)
    with pytest.raises(BesaError) as error:
        check_weight_files(model_copy)
    message = str(error.value)
    assert message.startswith("model.pretrained:") and expected in message
    assert str(weights_file(model_copy)) in message and "download or copy the model again" in message


def test_an_intact_folder_passes(model_copy, sharded_model):
    check_weight_files(model_copy)
    check_weight_files(sharded_model)


def test_a_missing_shard_is_named(sharded_model):
    shard = weights_file(sharded_model)
    shard.unlink()
    with pytest.raises(BesaError, match=f"the shard {shard} .*named in {INDEX_FILE} is missing"):
        check_weight_files(sharded_model)


def test_a_truncated_shard_of_an_indexed_model_is_named(sharded_model):
    truncate(sharded_model)
    with pytest.raises(BesaError, match=f"{weights_file(sharded_model)} is truncated"):
        check_weight_files(sharded_model)


def test_an_index_that_places_a_tensor_in_the_wrong_shard_is_named(sharded_model):
    index = json.loads((sharded_model / INDEX_FILE).read_text())
    first, other = sorted(set(index["weight_map"].values()))[:2]
    name = next(key for key, shard in index["weight_map"].items() if shard == first)
    index["weight_map"][name] = other
    (sharded_model / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(BesaError, match=f"lacks {name}, which {INDEX_FILE} places there"):
        check_weight_files(sharded_model)


def test_a_damaged_file_in_the_conversion_cache_says_to_delete_it(model_copy, monkeypatch):
    monkeypatch.setenv("BESA_CACHE", str(model_copy.parent))
    truncate(model_copy)
    with pytest.raises(BesaError, match=f"delete {model_copy} and run again"):
        check_weight_files(model_copy)


CLI_DAMAGE = {"truncated": truncate, "corrupt header": corrupt_header}


@pytest.mark.parametrize("damage", CLI_DAMAGE.values(), ids=CLI_DAMAGE.keys())
def test_fit_on_a_damaged_model_ends_in_one_line(damage, model_copy, calibration_text, tmp_path, capsys):
    expected = damage(model_copy)
    root = tmp_path / "run"
    line = failing_line(fit_args(model_copy, calibration_text, root), capsys)
    assert line.startswith("error: model.pretrained:") and expected in line
    assert_nothing_finished(root)


def test_fit_on_a_model_with_a_missing_shard_ends_in_one_line(sharded_model, calibration_text, tmp_path, capsys):
    weights_file(sharded_model).unlink()
    root = tmp_path / "run"
    line = failing_line(fit_args(sharded_model, calibration_text, root), capsys)
    assert f"named in {INDEX_FILE} is missing" in line
    assert_nothing_finished(root)


# ------------------------------------------------------------------ unwritable output folders
def test_an_output_folder_that_cannot_be_created(tiny_model_dir, calibration_text, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    root = blocker / "run"
    line = failing_line(fit_args(tiny_model_dir("llama"), calibration_text, root), capsys)
    assert line.startswith(f"error: trainer.default_root_dir={root}: cannot be created")
    assert line.endswith("choose a folder you can write to")


def test_an_output_folder_that_is_a_file(tiny_model_dir, calibration_text, tmp_path, capsys):
    root = tmp_path / "a-file"
    root.write_text("not a folder")
    line = failing_line(fit_args(tiny_model_dir("llama"), calibration_text, root), capsys)
    assert line.startswith(f"error: trainer.default_root_dir={root}: a file, not a folder")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_output_folder_that_cannot_be_written(tiny_model_dir, calibration_text, tmp_path, capsys):
    root = tmp_path / "read-only"
    root.mkdir()
    root.chmod(0o500)
    try:
        line = failing_line(fit_args(tiny_model_dir("llama"), calibration_text, root), capsys)
    finally:
        root.chmod(0o700)
    assert line.startswith(f"error: trainer.default_root_dir={root}: cannot be written to")
    assert list(root.iterdir()) == []


# ------------------------------------------------------------------ oversized settings
def test_activations_that_cannot_fit_in_any_ram_are_refused_at_once(tiny_model_dir, calibration_text, tmp_path, capsys):
    root = tmp_path / "run"
    args = fit_args(tiny_model_dir("llama"), calibration_text, root)
    args[args.index("--data.nsamples") + 1] = str(10**7)
    args[args.index("--data.seqlen") + 1] = "512"
    line = failing_line(args, capsys)
    need = activation_bytes(10**7, 512, 64, "float32", False)
    assert line.startswith(
        "error: data.nsamples=10000000 x data.seqlen=512: the calibration activations need "
        f"{need / 1e9:.1f} GB of RAM (2 x 10000000 x 512 x hidden 64 x 4 bytes) but "
    )
    assert "GB is available; lower data.nsamples or data.seqlen" in line and "--model.activation_dtype bfloat16" in line
    assert_nothing_finished(root)


def test_the_activation_check_counts_the_dtype_and_the_dense_trajectory(
    tiny_model_dir, calibration_text, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr("besa_pl.preflight.available_ram_bytes", lambda: 10_000)
    root = tmp_path / "run"
    extra = ("--model.activation_dtype", "bfloat16", "--model.target_mode", "dense_trajectory")
    line = failing_line(fit_args(tiny_model_dir("llama"), calibration_text, root, *extra), capsys)
    assert "(3 x 4 x 32 x hidden 64 x 2 bytes) but 0.0 GB is available" in line
    assert "activation_dtype" not in line  # already half size
    assert_nothing_finished(root)


def test_a_refused_overwrite_keeps_the_finished_run(tiny_model_dir, calibration_text, tmp_path, capsys, monkeypatch):
    root = tmp_path / "run"
    args = fit_args(tiny_model_dir("llama"), calibration_text, root, "--model.method", "magnitude")
    run_cli(args)
    assert (root / "sparsity.json").exists()
    monkeypatch.setattr("besa_pl.preflight.available_ram_bytes", lambda: 10_000)
    line = failing_line([*args, "--overwrite", "true"], capsys)
    assert "the calibration activations need" in line
    assert (root / "sparsity.json").exists() and (root / "pruned").is_dir()


def test_the_python_api_refuses_what_the_command_refuses(tiny_model_dir, calibration_text, tmp_path, monkeypatch):
    from besa_pl import BESAPruner, CalibrationDataModule, make_trainer

    monkeypatch.setattr("besa_pl.preflight.available_ram_bytes", lambda: 10_000)
    pruner = BESAPruner(pretrained=str(tiny_model_dir("llama")), method="magnitude")
    data = CalibrationDataModule(dataset=str(calibration_text), nsamples=4, seqlen=32)
    trainer = make_trainer(tmp_path, accelerator="cpu", logger=False, enable_progress_bar=False)
    with pytest.raises(BesaError, match="the calibration activations need"):
        trainer.fit(pruner, datamodule=data)
    assert data.tokens is None  # refused before the calibration text was read
    assert_nothing_finished(tmp_path)


# ------------------------------------------------------------------ kills
class KillAt(Callback):
    """Test helper: SIGKILL (no handler runs) at a step inside a block."""

    def __init__(self, block: int, batch: int) -> None:
        self.block, self.batch = block, batch

    def on_train_batch_start(self, trainer, pruner, batch, batch_idx):
        if pruner.block_index == self.block and batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)


KILL = "import os, signal\ndef kill(*args, **kwargs):\n    os.kill(os.getpid(), signal.SIGKILL)\n"
# Code run before the command: replaces one step of the run with a SIGKILL.
KILL_POINTS = {
    "during the calibration capture": "import besa_pl.models.activations as m\nm._Recorder.forward = kill\n",
    "mid block": None,  # KillAt, through the config
    "while a shard is written": (
        "import besa_pl.models.weights as m\nsave = m.save_file\n"
        "def half_then_kill(tensors, path, **kwargs):\n"
        "    save(tensors, path, **kwargs)\n"
        "    os.truncate(path, os.path.getsize(path) // 2)\n"
        "    kill()\n"
        "m.save_file = half_then_kill\n"
    ),
    "during the final write": "import besa_pl.models.weights as m\nm.swap_folder = kill\n",
}


@pytest.mark.parametrize("point", KILL_POINTS, ids=KILL_POINTS.keys())
def test_a_kill_leaves_nothing_finished_looking(point, tiny_model_dir, calibration_text, tmp_path):
    root = tmp_path / "run"
    args = fit_args(tiny_model_dir("llama"), calibration_text, root)
    if KILL_POINTS[point] is None:
        config = tmp_path / "kill.yaml"
        config.write_text(
            "trainer:\n  callbacks:\n    - class_path: tests.test_faults.KillAt\n"
            "      init_args: {block: 1, batch: 2}\n"
        )
        args = ["fit", "--config", str(config), *args[1:]]
    code = KILL + (KILL_POINTS[point] or "") + "import sys\nfrom besa_pl.cli import main\nmain(sys.argv[1:])\n"
    killed = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=str(REPO),
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert_nothing_finished(root)
    checkpoints = root / "checkpoints"
    if checkpoints.exists():  # only complete checkpoints, no temporary file
        assert {p.name for p in checkpoints.iterdir()} <= {"last.ckpt"}


# ------------------------------------------------------------------ temporary folders
def test_the_offload_folder_goes_with_its_model(tiny_model_dir, tmp_path, monkeypatch):
    import torch

    from besa_pl.models.source import offloaded_model

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model = offloaded_model(tiny_model_dir("llama"), torch.float32)
    assert [p.name.startswith("besa-offload-") for p in tmp_path.iterdir()] == [True]
    del model
    gc.collect()
    assert list(tmp_path.iterdir()) == []


def test_zero_shot_removes_its_task_files_and_skips_only_unreachable_data(tmp_path, monkeypatch):
    """A task whose data cannot be fetched is skipped; a broken lm-eval (any other error) ends the run."""
    from types import SimpleNamespace

    import lm_eval
    import lm_eval.models.huggingface
    import lm_eval.tasks
    from datasets.exceptions import DatasetNotFoundError

    from besa_pl.eval.zero_shot import ZeroShotEval

    data = tmp_path / "data" / "boolq"
    data.mkdir(parents=True)
    (data / "val.jsonl").write_text(json.dumps({"question": "q", "passage": "p", "label": "true"}) + "\n")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setattr(lm_eval.models.huggingface, "HFLM", lambda **kwargs: object())
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", lambda: None)  # indexing every task takes seconds
    monkeypatch.setattr("besa_pl.eval.zero_shot_tasks.lm_eval_task_config", lambda manager, name: {"task": name})
    pruner = SimpleNamespace(results={}, tokenizer=None, evaluation_model=lambda offload: (object(), "cpu"))
    trainer = SimpleNamespace(is_global_zero=True, datamodule=None, logger=None)
    callback = ZeroShotEval(tasks=["boolq"], data_dir=str(tmp_path / "data"))

    def unreachable(**kwargs):
        raise DatasetNotFoundError("no such dataset")

    monkeypatch.setattr(lm_eval, "simple_evaluate", unreachable)
    callback.on_fit_end(trainer, pruner)
    assert pruner.results["zero_shot"]["skipped"]["boolq"].startswith("DatasetNotFoundError")
    assert list(scratch.iterdir()) == []

    def broken(**kwargs):
        raise AttributeError("'TaskManager' object has no attribute 'task_index'")

    monkeypatch.setattr(lm_eval, "simple_evaluate", broken)
    with pytest.raises(AttributeError):
        callback.on_fit_end(trainer, pruner)
    assert list(scratch.iterdir()) == []
