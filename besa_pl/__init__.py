"""besa-pl: BESA pruning of LLMs as a PyTorch Lightning program."""

__version__ = "0.2.0"

from .block import BESABlock
from .data import CalibrationDataModule
from .pruner import BESAPruner

__all__ = ["BESABlock", "BESAPruner", "CalibrationDataModule"]
