"""`besa-pl`: the command.

`besa-pl`, `besa-pl --help` and `besa-pl --version` answer from here without importing torch,
Lightning or transformers; a subcommand loads the LightningCLI part (`besa_pl.lightning_cli`).
"""

from __future__ import annotations

import os
import sys

from besa_pl import __version__
from besa_pl.commands import DESCRIPTION, SUBCOMMANDS

HELP_FLAGS = ("-h", "--help")


def usage() -> str:
    commands = "\n".join(f"  {name:<10}{line}" for name, line in SUBCOMMANDS.items())
    return (
        f"usage: besa-pl [--verbose] {{{','.join(SUBCOMMANDS)}}} ...\n\n{DESCRIPTION}\n\n"
        f"commands:\n{commands}\n\n"
        "options:\n"
        "  -h, --help  show this help and exit; `besa-pl fit --help` lists every setting\n"
        "  --version   show the version and exit\n"
        "  --verbose   library output, and the full traceback of an unexpected error\n"
    )


def _subcommand(args: list[str]) -> str | None:
    """The first argument that is not an option or an option's value (`-c FILE`, `--config FILE`)."""
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg in ("-c", "--config"):
            skip = True
        elif not arg.startswith("-"):
            return arg
    return None


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in args
    args = [arg for arg in args if arg != "--verbose"]
    command = _subcommand(args)
    if command is None and "--version" in args:
        print(f"besa-pl {__version__}")
        return
    if command is None and (not args or any(arg in HELP_FLAGS for arg in args)):
        print(usage(), end="")
        return
    if command is not None and command not in SUBCOMMANDS:
        print(f"error: unknown command {command}; use {' or '.join(SUBCOMMANDS)} (besa-pl --help)", file=sys.stderr)
        sys.exit(2)
    # Bit-identical resume on CPU needs the same float sums in every run: MKL may otherwise use fewer
    # threads than asked when the machine is busy (MKL_DYNAMIC), which changes the sums' order. Set by
    # the command, before torch loads, never by `import besa_pl`.
    os.environ.setdefault("MKL_DYNAMIC", "FALSE")
    from besa_pl.lightning_cli import run

    run(args, verbose)


if __name__ == "__main__":
    main()
