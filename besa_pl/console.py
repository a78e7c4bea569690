"""The one console besa-pl prints to: stderr, and only on rank 0 under DDP."""

from __future__ import annotations

from rich.console import Console

from .distributed import is_main


class RankZeroConsole(Console):
    def print(self, *args, **kwargs) -> None:
        if is_main():
            super().print(*args, **kwargs)


console = RankZeroConsole(stderr=True)
