"""besa-pl: BESA pruning of LLMs as a PyTorch Lightning program.

`import besa_pl` is light (no torch, no environment changes); the classes below load on first use.
"""

from __future__ import annotations

import importlib

__version__ = "0.2.0"

_EXPORTS = {
    "BESABlock": "besa_pl.besa.block",
    "BESAPruner": "besa_pl.besa.pruner",
    "CalibrationDataModule": "besa_pl.data.calibration",
    "PruneSettings": "besa_pl.settings",
    "make_trainer": "besa_pl.loop.trainer",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'besa_pl' has no attribute {name!r}")
