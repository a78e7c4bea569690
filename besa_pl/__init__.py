"""besa-pl: BESA pruning of LLMs as a PyTorch Lightning program."""

from .block import BESABlock
from .data import CalibrationDataModule
from .pruner import BESAPruner

__all__ = ["BESABlock", "BESAPruner", "CalibrationDataModule"]
