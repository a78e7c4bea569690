"""Kill-and-resume equality, checkpoint contents, fingerprint and corruption errors."""

import json

import pytest
import torch
from lightning.pytorch import Callback

from .conftest import REPO, fit_args, run_cli, saved_weights


class InterruptAt(Callback):
    """Test helper: raise at a chosen point, like Ctrl-C (KeyboardInterrupt) or a crash (RuntimeError)."""

    def __init__(self, block: int, batch: int | None = None, crash: bool = False) -> None:
        self.block, self.batch, self.crash = block, batch, crash

    def _stop(self):
        raise RuntimeError("simulated crash") if self.crash else KeyboardInterrupt

    def on_train_batch_start(self, trainer, pruner, batch, batch_idx):
        if self.batch is not None and pruner.block_index == self.block and batch_idx == self.batch:
            self._stop()

    def on_train_epoch_end(self, trainer, pruner):
        if self.batch is None and pruner.block_index == self.block + 1:
            self._stop()


def interrupt_config(tmp_path, block, batch=None, crash=False):
    path = tmp_path / f"interrupt-{block}-{batch}-{crash}.yaml"
    args = {"block": block, "batch": batch, "crash": crash}
    path.write_text(
        "trainer:\n  callbacks:\n    - class_path: tests.test_resume.InterruptAt\n"
        f"      init_args: {json.dumps(args)}\n"
    )
    return str(path)


def pruned_weights(root):
    return saved_weights(root / "pruned")


@pytest.fixture(scope="module")
def reference(tiny_model_dir, calibration_text, tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    run_cli(fit_args(tiny_model_dir("llama"), calibration_text, root))
    return pruned_weights(root)


def _interrupted_then_resumed(tiny_model_dir, calibration_text, tmp_path, capsys, block, batch=None, crash=False):
    args = fit_args(tiny_model_dir("llama"), calibration_text, tmp_path)
    with pytest.raises((SystemExit, RuntimeError)):
        run_cli(["fit", "--config", interrupt_config(tmp_path, block, batch, crash), *args[1:]])
    assert not (tmp_path / "sparsity.json").exists()
    assert not (tmp_path / "pruned").exists()
    capsys.readouterr()
    run_cli(args + ["--ckpt_path", "last"])
    # Ctrl-C saves where the run stands; a crash saves nothing, so the last finished block's checkpoint is used.
    if batch is None:
        resumed_at, step = (block if crash else block + 1), 0
    else:
        resumed_at, step = block, (0 if crash else batch)
    err = " ".join(capsys.readouterr().err.split())
    if crash and resumed_at == 0:
        assert "resuming" not in err  # no block finished, no checkpoint: a fresh start
    else:
        assert f"resuming at block {resumed_at + 1}/3 (a checkpoint taken {step} steps into it)" in err
    return pruned_weights(tmp_path)


@pytest.mark.parametrize(
    "block,batch,crash",
    [(0, None, False), (1, None, True), (1, 2, False), (2, 0, False), (0, 3, True)],
    ids=[
        "ctrl-c after block 0",
        "crash after block 1",
        "ctrl-c inside block 1",
        "ctrl-c at start of block 2",
        "crash inside block 0",
    ],
)
def test_resume_gives_the_same_masks_as_an_uninterrupted_run(
    block, batch, crash, reference, tiny_model_dir, calibration_text, tmp_path, capsys
):
    resumed = _interrupted_then_resumed(tiny_model_dir, calibration_text, tmp_path, capsys, block, batch, crash)
    assert resumed.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(resumed[name], tensor), name
        assert torch.equal(resumed[name] == 0, tensor == 0), name


def _tensor_bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def test_checkpoint_holds_no_base_weights(tiny_model_dir, calibration_text, tmp_path):
    args = fit_args(tiny_model_dir("llama"), calibration_text, tmp_path)
    with pytest.raises(SystemExit):
        run_cli(["fit", "--config", interrupt_config(tmp_path, 1, 2), *args[1:]])
    checkpoint = torch.load(tmp_path / "checkpoints" / "last-interrupted.ckpt", weights_only=False)
    assert checkpoint["state_dict"] == {}
    state = checkpoint["besa"]
    assert state["block_index"] == 1
    assert state["block_logs"][0]["shard"] == "model-00001-of-00004.safetensors"
    assert state["model_fingerprint"] and state["settings"]["model.sparsity"] == 0.5
    # Only the current block's logits and their optimizer state: a small fraction of one block.
    block = sum(
        t.numel() * t.element_size() for n, t in saved_weights(tiny_model_dir("llama")).items() if "layers.1." in n
    )
    logits = _tensor_bytes(state["block_state"]["trainable"])
    assert 0 < logits and _tensor_bytes(checkpoint) <= 5 * logits < 50 * block


def test_resume_with_a_changed_setting_names_it(tiny_model_dir, calibration_text, tmp_path, capsys):
    args = fit_args(tiny_model_dir("llama"), calibration_text, tmp_path)
    with pytest.raises(SystemExit):
        run_cli(["fit", "--config", interrupt_config(tmp_path, 0), *args[1:]])
    with pytest.raises(SystemExit) as stop:
        run_cli(args + ["--model.sparsity", "0.6", "--ckpt_path", "last"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "model.sparsity=0.5 in the checkpoint but 0.6 now" in " ".join(err.split())


def test_a_checkpoint_from_before_the_damping_setting_resumes_with_the_damping_it_ran(
    tiny_model_dir, calibration_text, tmp_path, capsys
):
    args = fit_args(tiny_model_dir("llama"), calibration_text, tmp_path)
    earlier = args + ["--model.percdamp", "0.01"]  # the earlier version ran every sweep and solve at 0.01
    with pytest.raises(SystemExit):
        run_cli(["fit", "--config", interrupt_config(tmp_path, 0), *earlier[1:]])
    path = tmp_path / "checkpoints" / "last-interrupted.ckpt"
    checkpoint = torch.load(path, weights_only=False)
    del checkpoint["besa"]["settings"]["model.percdamp"]  # what a checkpoint of the earlier version holds
    torch.save(checkpoint, path)
    with pytest.raises(SystemExit):  # today's default for the reconstruction is 0.1: not what it ran
        run_cli(args + ["--ckpt_path", "last"])
    assert "model.percdamp=0.01 in the checkpoint but 0.1 now" in " ".join(capsys.readouterr().err.split())
    run_cli(earlier + ["--ckpt_path", "last"])
    assert "resuming at block 2/3" in " ".join(capsys.readouterr().err.split())


def test_resume_against_another_model_is_refused(tiny_model_dir, calibration_text, tmp_path, capsys):
    args = fit_args(tiny_model_dir("llama"), calibration_text, tmp_path)
    with pytest.raises(SystemExit):
        run_cli(["fit", "--config", interrupt_config(tmp_path, 0), *args[1:]])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"))
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.mul_(1.01)  # a fine-tuned sibling: same shapes
    model.save_pretrained(tmp_path / "other")
    AutoTokenizer.from_pretrained(tiny_model_dir("llama")).save_pretrained(tmp_path / "other")
    other = fit_args(tmp_path / "other", calibration_text, tmp_path)
    with pytest.raises(SystemExit):
        run_cli(other + ["--ckpt_path", "last"])
    assert "different base model" in " ".join(capsys.readouterr().err.split())


def test_truncated_checkpoint_gives_a_clear_error(tiny_model_dir, calibration_text, tmp_path, capsys):
    args = fit_args(tiny_model_dir("llama"), calibration_text, tmp_path)
    with pytest.raises(SystemExit):
        run_cli(["fit", "--config", interrupt_config(tmp_path, 0), *args[1:]])
    path = tmp_path / "checkpoints" / "last-interrupted.ckpt"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(SystemExit):
        run_cli(args + ["--ckpt_path", str(path)])
    assert "corrupt or truncated" in " ".join(capsys.readouterr().err.split())


class SignalAt(Callback):
    """Test helper: the process sends itself a signal inside block 1, as a scheduler would."""

    def __init__(self, signal_name: str) -> None:
        self.signal_name = signal_name

    def on_train_batch_start(self, trainer, pruner, batch, batch_idx):
        if pruner.block_index == 1 and batch_idx == 2:
            import os
            import signal

            os.kill(os.getpid(), getattr(signal, self.signal_name))


def signal_config(tmp_path, name):
    path = tmp_path / f"signal-{name}.yaml"
    path.write_text(
        "trainer:\n  callbacks:\n    - class_path: tests.test_resume.SignalAt\n"
        f"      init_args: {{signal_name: {name}}}\n"
    )
    return str(path)


def test_sigterm_saves_where_the_run_stands(reference, tiny_model_dir, calibration_text, tmp_path, capsys):
    args = fit_args(tiny_model_dir("llama"), calibration_text, tmp_path)
    with pytest.raises(SystemExit) as stop:
        run_cli(["fit", "--config", signal_config(tmp_path, "SIGTERM"), *args[1:]])
    assert stop.value.code == 143
    state = torch.load(tmp_path / "checkpoints" / "last-interrupted.ckpt", weights_only=False)["besa"]
    assert state["block_index"] == 1 and state["block_state"] is not None
    capsys.readouterr()
    run_cli(args + ["--ckpt_path", "last"])
    assert "resuming at block 2/3" in " ".join(capsys.readouterr().err.split())
    resumed = pruned_weights(tmp_path)
    assert all(torch.equal(resumed[name], tensor) for name, tensor in reference.items())


def test_after_sigkill_the_last_finished_block_checkpoint_is_intact(
    reference, tiny_model_dir, calibration_text, tmp_path
):
    import os
    import subprocess
    import sys

    args = fit_args(tiny_model_dir("llama"), calibration_text, tmp_path)
    code = "import sys; from besa_pl.cli import main; main(sys.argv[1:])"
    killed = subprocess.run(
        [sys.executable, "-c", code, "fit", "--config", signal_config(tmp_path, "SIGKILL"), *args[1:]],
        capture_output=True,
        cwd=str(REPO),
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert killed.returncode == -9
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt"]  # no temporary left
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["besa"]
    assert state["block_index"] == 1
    run_cli(args + ["--ckpt_path", "last"])
    resumed = pruned_weights(tmp_path)
    assert all(torch.equal(resumed[name], tensor) for name, tensor in reference.items())


def test_resume_inside_a_block_with_joint_quantization(tiny_model_dir, calibration_text, tmp_path):
    quant = ["--model.quant.bits", "4", "--model.quant.group_size", "16"]
    straight = tmp_path / "straight"
    run_cli(fit_args(tiny_model_dir("llama"), calibration_text, straight, *quant))
    args = fit_args(tiny_model_dir("llama"), calibration_text, tmp_path / "resumed", *quant)
    with pytest.raises(SystemExit):
        run_cli(["fit", "--config", interrupt_config(tmp_path, 1, 2), *args[1:]])
    run_cli(args + ["--ckpt_path", "last"])
    expected, resumed = pruned_weights(straight), pruned_weights(tmp_path / "resumed")
    assert all(torch.equal(resumed[name], tensor) for name, tensor in expected.items())


def test_a_fresh_fit_never_resumes_silently(tiny_model_dir, calibration_text, tmp_path, capsys):
    args = fit_args(tiny_model_dir("llama"), calibration_text, tmp_path)
    with pytest.raises(SystemExit):
        run_cli(["fit", "--config", interrupt_config(tmp_path, 0), *args[1:]])
    with pytest.raises(SystemExit) as stop:
        run_cli(args)
    assert stop.value.code == 2
    assert "holds an unfinished run (resume it with --ckpt_path last)" in " ".join(capsys.readouterr().err.split())
    run_cli(args + ["--overwrite", "true"])
    assert "resuming" not in " ".join(capsys.readouterr().err.split())
    assert (tmp_path / "sparsity.json").exists()


@pytest.mark.parametrize("block,batch", [(0, None), (1, 2)], ids=["after block 0", "inside block 1"])
def test_resume_with_reconstruction_gives_the_same_weights(block, batch, tiny_model_dir, calibration_text, tmp_path):
    extra = ["--model.reconstruct", "obs", "--model.target_mode", "dense_trajectory"]
    straight = tmp_path / "straight"
    run_cli(fit_args(tiny_model_dir("llama"), calibration_text, straight, *extra))
    args = fit_args(tiny_model_dir("llama"), calibration_text, tmp_path / "resumed", *extra)
    with pytest.raises(SystemExit):
        run_cli(["fit", "--config", interrupt_config(tmp_path, block, batch), *args[1:]])
    run_cli(args + ["--ckpt_path", "last"])
    expected, resumed = saved_weights(straight / "pruned"), saved_weights(tmp_path / "resumed" / "pruned")
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(resumed[name], tensor) for name, tensor in expected.items())
