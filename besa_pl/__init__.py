"""besa-pl: BESA pruning of LLMs as a PyTorch Lightning program."""

__version__ = "0.2.0"

import os

# Bit-identical resume on CPU needs the same float sums in every run: MKL may otherwise use fewer
# threads than asked when the machine is busy (MKL_DYNAMIC), which changes the sums' order.
os.environ.setdefault("MKL_DYNAMIC", "FALSE")

from .block import BESABlock  # noqa: E402
from .data import CalibrationDataModule  # noqa: E402
from .pruner import BESAPruner  # noqa: E402

__all__ = ["BESABlock", "BESAPruner", "CalibrationDataModule"]
