"""The command introduces itself, offers only what means something here, and answers help cheaply."""

import os
import subprocess
import sys

import pytest
from lightning.pytorch import Callback

from .conftest import REPO, fit_args, run_cli


def python(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=False,
        cwd=str(REPO),
        env={**(env if env is not None else os.environ), "PYTHONPATH": str(REPO)},
    )


@pytest.mark.parametrize("args", [["--help"], ["-h"], []], ids=["--help", "-h", "no arguments"])
def test_help_describes_besa_pl_and_offers_fit_only_without_loading_torch(args):
    code = (
        "import sys; from besa_pl.cli import main; main(sys.argv[1:]); "
        "print([m for m in ('torch', 'lightning', 'transformers') if m in sys.modules])"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=str(REPO),
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.strip().endswith("[]")  # none of the heavy libraries was imported
    assert out.startswith("usage: besa-pl")
    assert "besa-pl: prune a causal language model with BESA" in out
    assert "Lightning Trainer command line tool" not in out
    commands = out.split("commands:\n")[1].split("\n\n")[0].splitlines()
    assert [line.split()[0] for line in commands] == ["fit"]
    assert "Prune a model and evaluate it" in commands[0]
    for other in ("validate", "test", "predict"):
        assert other not in out


def test_version_and_an_unknown_command_answer_without_loading_torch():
    done = python(
        "import sys\nfrom besa_pl.cli import main\nmain(['--version'])\n"
        "try:\n    main(['validate'])\nexcept SystemExit as stop:\n    print('exit', stop.code)\n"
        "print('torch' in sys.modules)"
    )
    from besa_pl import __version__

    assert done.stdout.splitlines() == [f"besa-pl {__version__}", "exit 2", "False"]
    assert done.stderr.strip() == "error: unknown command validate; use fit (besa-pl --help)"


def test_importing_the_command_changes_no_environment_and_running_it_sets_mkl_dynamic():
    env = {k: v for k, v in os.environ.items() if k != "MKL_DYNAMIC"}
    done = python(
        "import os\nimport besa_pl.cli\nfrom besa_pl.models import memory\n"
        "print(os.environ.get('MKL_DYNAMIC'))\n"
        "try:\n    besa_pl.cli.main(['fit', '--help'])\nexcept SystemExit:\n    pass\n"
        "print(os.environ.get('MKL_DYNAMIC'))",
        env,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "None" and lines[-1] == "FALSE"


def test_fit_help_describes_fit_and_has_no_optimizer_settings(capsys):
    with pytest.raises(SystemExit) as stop:
        run_cli(["fit", "--help"])
    assert stop.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert out.startswith("usage: besa-pl")
    assert "Prune a model and evaluate it as the config's callbacks say" in out
    assert "--model.sparsity" in out and "--overwrite" in out
    assert "--optimizer" not in out and "--lr_scheduler" not in out


class FailsAtStart(Callback):
    """Test helper: a programming error inside the run."""

    def on_fit_start(self, trainer, pruner):
        raise RuntimeError("a bug in a callback\nsecond line")


def failing_config(tmp_path) -> str:
    path = tmp_path / "fails.yaml"
    path.write_text("trainer:\n  callbacks:\n    - class_path: tests.test_cli.FailsAtStart\n")
    return str(path)


def test_an_unexpected_error_is_one_line_and_its_traceback_needs_verbose(
    tiny_model_dir, calibration_text, tmp_path, capsys
):
    args = fit_args(tiny_model_dir("llama"), calibration_text, tmp_path / "run", "--model.method", "magnitude")
    with pytest.raises(SystemExit) as stop:
        run_cli(["fit", "--config", failing_config(tmp_path), *args[1:]])
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1] == "error: RuntimeError: a bug in a callback; run again with --verbose for the traceback"
    with pytest.raises(RuntimeError, match="a bug in a callback"):
        run_cli(["fit", "--verbose", "--config", failing_config(tmp_path), *args[1:], "--overwrite", "true"])


def test_make_trainer_gives_the_commands_defaults(tmp_path):
    from besa_pl.callbacks import BlockwiseLoop
    from besa_pl.loop.progress import BlockProgress
    from besa_pl.loop.trainer import TRAINER_DEFAULTS, make_trainer

    trainer = make_trainer(tmp_path, accelerator="cpu", logger=False)
    assert trainer.num_devices == 1 and TRAINER_DEFAULTS["devices"] == 1
    assert trainer.num_sanity_val_steps == 0
    assert isinstance(trainer.callbacks[0], BlockwiseLoop)
    assert sum(isinstance(c, BlockProgress) for c in trainer.callbacks) == 1
    quiet = make_trainer(tmp_path, accelerator="cpu", logger=False, enable_progress_bar=False)
    assert not any(isinstance(c, BlockProgress) for c in quiet.callbacks)
