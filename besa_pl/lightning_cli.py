"""The `fit` command: LightningCLI with besa-pl's one-line errors, Trainer defaults and checks.

Imported by `besa_pl.cli.main` only for a real subcommand, so `besa-pl --help` stays light.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import warnings
from pathlib import Path

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException
from rich.markup import escape

from besa_pl import __version__
from besa_pl.besa.pruner import BESAPruner
from besa_pl.commands import DESCRIPTION, SUBCOMMANDS
from besa_pl.compat import KeepCommandLineOnResume
from besa_pl.console import console, quiet_third_party
from besa_pl.data.calibration import CalibrationDataModule
from besa_pl.errors import BesaError
from besa_pl.loop.sparsity_report import FINISHED_MARKER, is_finished_run
from besa_pl.loop.trainer import (
    TRAINER_DEFAULTS,
    blockwise_strategy,
    complete_callbacks,
    complete_plugins,
    latest_checkpoint,
)
from besa_pl.preflight import check_before_fit


def parser_error_line(message: str) -> str:
    """jsonargparse's several-line message about a bad value, as one line that names the setting."""
    key = re.search(r'Parser key "([^"]+)"', message)
    given = re.search(r"(?:Got value|Given value): (.*)", message)
    if key and given:
        setting, value = key.group(1), given.group(1).strip()
        choices = re.search(r"Literal\[(.*?)\]", message)
        if choices:
            return f"{setting}={value}: unknown value; use one of {choices.group(1).replace(chr(39), '')}"
        types = re.findall(r"<class '(\w+)'>", message)
        wanted = " or ".join(dict.fromkeys("null" if t == "NoneType" else t for t in types)) or "another value"
        return f"{setting}={value}: expected {wanted}"
    unknown = re.match(r"unrecognized arguments: (.*)", message)
    if unknown:
        first = unknown.group(1).split()
        if first[0] == "--config" and len(first) > 1 and not Path(first[1]).exists():
            return f"--config {first[1]}: no such file; give the path of a besa-pl config (e.g. cli.yaml)"
        return f"unknown setting {first[0]}; `besa-pl fit --help` lists the settings"
    return " ".join(message.split())


class _OneLineErrorParser(LightningArgumentParser):
    def error(self, message: str, ex=None):
        raise BesaError(parser_error_line(message))


class BesaCLI(KeepCommandLineOnResume, LightningCLI):
    """LightningCLI with `fit` only, the checks before any work and the callbacks every run needs."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("parser_class", _OneLineErrorParser)
        kwargs.setdefault("auto_configure_optimizers", False)  # each block brings its own optimizers
        kwargs.setdefault(
            "parser_kwargs", {"prog": "besa-pl", "description": DESCRIPTION, "fit": {"description": SUBCOMMANDS["fit"]}}
        )
        super().__init__(*args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Only `fit` means something for a pruning run (the arguments it takes from the classes)."""
        return {"fit": LightningCLI.subcommands()["fit"]}

    def init_parser(self, **kwargs) -> LightningArgumentParser:
        kwargs.setdefault("dump_header", [f"besa-pl {__version__}"])
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--overwrite",
            type=bool,
            default=False,
            help="Prune again into a trainer.default_root_dir that holds a finished run",
        )

    def instantiate_trainer(self, **kwargs):
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer = config["trainer"]
        root = Path(trainer.get("default_root_dir") or os.getcwd())
        progress = trainer.get("enable_progress_bar") is not False
        trainer["callbacks"] = complete_callbacks(trainer.get("callbacks"), root, progress)
        trainer["plugins"] = complete_plugins(trainer.get("plugins"))
        trainer["strategy"] = blockwise_strategy(trainer.get("strategy", "auto"))
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        config = self.config[self.subcommand]
        root = Path(self.trainer.default_root_dir)
        if config.get("ckpt_path") == "last":
            # The newer of last.ckpt (after a block) and last-interrupted.ckpt (Ctrl-C, SIGTERM).
            latest = latest_checkpoint(root)
            self.config_init[self.subcommand]["ckpt_path"] = latest
            if latest is None:
                console.print(f"no checkpoint in {root / 'checkpoints'} yet: starting from the first block")
        elif not config.get("ckpt_path"):
            checkpoints = root / "checkpoints"
            unfinished = checkpoints.is_dir() and any(checkpoints.glob("*.ckpt"))
            if (is_finished_run(root) or unfinished) and not config.get("overwrite"):
                what = (
                    "a finished run" if is_finished_run(root) else "an unfinished run (resume it with --ckpt_path last)"
                )
                raise BesaError(
                    f"trainer.default_root_dir={root} already holds {what}; "
                    "pass --overwrite true or choose another --trainer.default_root_dir"
                )
        check_before_fit(self.trainer, self.model, self.datamodule)  # before the old run is removed
        if config.get("overwrite") and not config.get("ckpt_path"):  # a fresh start must find nothing of the old run
            for name in ("checkpoints", "pruned", "packed", "pruned.partial", "packed.partial"):
                shutil.rmtree(root / name, ignore_errors=True)
            for name in (FINISHED_MARKER, "results.json", "allocation.png"):
                (root / name).unlink(missing_ok=True)


def user_error(error: BaseException | None) -> BesaError | None:
    """The BesaError behind `error`, if any (jsonargparse re-raises errors of the classes it builds)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, BesaError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def quiet_libraries() -> None:
    """Third-party progress bars, hub retries and info lines stay quiet unless --verbose."""
    os.environ.setdefault("TQDM_DISABLE", "1")  # bars of libraries imported from here on
    quiet_third_party()  # the others: see console.third_party_output
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", module="lightning")
    for name in (
        "lightning.pytorch.utilities.rank_zero",
        "lightning.fabric.utilities.seed",
        "lightning.pytorch",
        "lm_eval",
        "datasets",
        "huggingface_hub",
        "urllib3",
        "filelock",
    ):
        logging.getLogger(name).setLevel(logging.ERROR)
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def one_line(error: BaseException) -> str:
    """An unexpected error as one line: its type and the first line of its message."""
    message = (str(error).strip().splitlines() or [""])[0][:300]
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def run(args: list[str], verbose: bool) -> None:
    """Run the command; a user error ends in one line (exit 2), any other error in one line naming
    it (exit 1) or, with --verbose, its traceback."""
    if not verbose:
        quiet_libraries()
    try:
        BesaCLI(
            BESAPruner,
            CalibrationDataModule,
            args=args,
            save_config_kwargs={"overwrite": True},
            trainer_defaults=dict(TRAINER_DEFAULTS),
        )
    except SIGTERMException:
        console.print("stopped by SIGTERM; resume with --ckpt_path last")
        sys.exit(143)
    except Exception as error:
        if verbose:
            raise
        besa = user_error(error)  # also when jsonargparse wrapped it while building a callback
        if besa is not None:
            console.print(f"[bold red]error:[/] {escape(str(besa))}", soft_wrap=True)
            sys.exit(2)
        console.print(
            f"[bold red]error:[/] {escape(one_line(error))}; run again with --verbose for the traceback", soft_wrap=True
        )
        sys.exit(1)
