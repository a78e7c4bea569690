"""`besa-pl`: the LightningCLI entry point."""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import warnings
from pathlib import Path

from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException
from rich.console import Console

from . import __version__
from .data import CalibrationDataModule
from .errors import BesaError
from .export import is_finished_run
from .pruner import BESAPruner
from .runtime import complete_callbacks, complete_plugins

console = Console(stderr=True)


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


class BesaCLI(LightningCLI):
    """LightningCLI with the callbacks every besa-pl run needs added to the Trainer."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("parser_class", _OneLineErrorParser)
        super().__init__(*args, **kwargs)

    def init_parser(self, **kwargs) -> LightningArgumentParser:
        kwargs.setdefault("dump_header", [f"besa-pl {__version__}"])
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--overwrite", type=bool, default=False,
                            help="Prune again into a trainer.default_root_dir that holds a finished run")

    def _parse_ckpt_path(self) -> None:
        # LightningCLI would copy the checkpoint's hyperparameters over the command line; besa-pl
        # instead compares them on resume and refuses a mismatch with a message naming the setting.
        pass

    def instantiate_trainer(self, **kwargs):
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        root = Path(config["trainer"].get("default_root_dir") or os.getcwd())
        callbacks = complete_callbacks(config["trainer"].get("callbacks"), root)
        progress = config["trainer"].get("enable_progress_bar") is not False
        if progress and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(RichProgressBar(leave=False))
        config["trainer"]["callbacks"] = callbacks
        config["trainer"]["plugins"] = complete_plugins(config["trainer"].get("plugins"))
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        config = self.config[self.subcommand]
        root = Path(self.trainer.default_root_dir)
        if config.get("ckpt_path"):
            return
        checkpoints = root / "checkpoints"
        unfinished = checkpoints.is_dir() and any(checkpoints.glob("*.ckpt"))
        if (is_finished_run(root) or unfinished) and not config.get("overwrite"):
            what = "a finished run" if is_finished_run(root) else "an unfinished run (resume it with --ckpt_path last)"
            raise BesaError(
                f"trainer.default_root_dir={root} already holds {what}; "
                "pass --overwrite true or choose another --trainer.default_root_dir"
            )
        if unfinished:
            shutil.rmtree(checkpoints)  # --overwrite: a fresh start must not find the old run's checkpoints


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in args
    if verbose:
        args.remove("--verbose")
    else:
        os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval / datasets / transformers progress bars
        warnings.filterwarnings("ignore", module="lightning")
        logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    try:
        BesaCLI(
            BESAPruner,
            CalibrationDataModule,
            args=args,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"num_sanity_val_steps": 0, "enable_model_summary": False, "devices": 1},
        )
    except BesaError as error:
        if verbose:
            raise
        console.print(f"[bold red]error:[/] {error}", soft_wrap=True)
        sys.exit(2)
    except SIGTERMException:
        console.print("stopped by SIGTERM; resume with --ckpt_path last")
        sys.exit(143)


if __name__ == "__main__":
    main()
