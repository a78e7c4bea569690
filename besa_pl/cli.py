"""`besa-pl`: the LightningCLI entry point."""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import warnings
from pathlib import Path

# Bit-identical resume on CPU needs the same float sums in every run: MKL may otherwise use fewer
# threads than asked when the machine is busy (MKL_DYNAMIC), which changes the sums' order. Set by
# the command, before torch loads, never by `import besa_pl`.
os.environ.setdefault("MKL_DYNAMIC", "FALSE")

from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from besa_pl import __version__
from besa_pl.besa.pruner import BESAPruner
from besa_pl.compat import KeepCommandLineOnResume
from besa_pl.console import console, quiet_third_party
from besa_pl.data.calibration import CalibrationDataModule
from besa_pl.errors import BesaError
from besa_pl.loop.progress import BlockProgress
from besa_pl.loop.sparsity_report import FINISHED_MARKER, is_finished_run
from besa_pl.loop.trainer import (
    blockwise_strategy,
    complete_callbacks,
    complete_plugins,
    latest_checkpoint,
)


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

    def instantiate_trainer(self, **kwargs):
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        root = Path(config["trainer"].get("default_root_dir") or os.getcwd())
        callbacks = complete_callbacks(config["trainer"].get("callbacks"), root)
        progress = config["trainer"].get("enable_progress_bar") is not False
        if progress and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(BlockProgress())
        config["trainer"]["callbacks"] = callbacks
        config["trainer"]["plugins"] = complete_plugins(config["trainer"].get("plugins"))
        config["trainer"]["strategy"] = blockwise_strategy(config["trainer"].get("strategy", "auto"))
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        config = self.config[self.subcommand]
        root = Path(self.trainer.default_root_dir)
        if config.get("ckpt_path") == "last":
            # The newer of last.ckpt (after a block) and last-interrupted.ckpt (Ctrl-C, SIGTERM).
            latest = latest_checkpoint(root)
            self.config_init[self.subcommand]["ckpt_path"] = latest
            if latest is not None:
                return
            console.print(f"no checkpoint in {root / 'checkpoints'} yet: starting from the first block")
            return
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
        if config.get("overwrite"):  # a fresh start must find nothing of the old run
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
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.seed", "lightning.pytorch",
                 "lm_eval", "datasets", "huggingface_hub", "urllib3", "filelock"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in args
    if verbose:
        args.remove("--verbose")
    else:
        quiet_libraries()
    try:
        BesaCLI(
            BESAPruner,
            CalibrationDataModule,
            args=args,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"num_sanity_val_steps": 0, "enable_model_summary": False, "devices": 1,
                              "use_distributed_sampler": False},
        )
    except Exception as error:
        besa = user_error(error)  # also when jsonargparse wrapped it while building a callback
        if besa is None or verbose:
            raise
        console.print(f"[bold red]error:[/] {besa}", soft_wrap=True)
        sys.exit(2)
    except SIGTERMException:
        console.print("stopped by SIGTERM; resume with --ckpt_path last")
        sys.exit(143)


if __name__ == "__main__":
    main()
