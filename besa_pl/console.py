"""The one console besa-pl prints to: stderr, and only on rank 0 under DDP."""

from __future__ import annotations

import contextlib
import io
import sys

from rich.console import Console

from besa_pl.ranks import is_main


class RankZeroConsole(Console):
    def print(self, *args, **kwargs) -> None:
        if is_main():
            super().print(*args, **kwargs)


console = RankZeroConsole(stderr=True)


def stage(message: str) -> None:
    """One line per stage (writing calibration text, capture, evaluation) when stderr is not a terminal:
    a redirected log is never silent for minutes while a terminal shows the progress bars instead."""
    if not console.is_terminal:
        console.print(message, soft_wrap=True)  # one line however long, for log readers


_quiet = {"third_party": False}


def quiet_third_party(on: bool = True) -> None:
    """Set by the CLI unless --verbose: library progress bars are swallowed (see `third_party_output`)."""
    _quiet["third_party"] = on


@contextlib.contextmanager
def third_party_output():
    """Around calls into libraries whose tqdm bars read TQDM_DISABLE only at import time (lm-eval,
    datasets): their stderr goes nowhere when quiet; exceptions still propagate."""
    if not _quiet["third_party"]:
        yield
        return
    with contextlib.redirect_stderr(io.StringIO()):
        yield
    sys.stderr.flush()
