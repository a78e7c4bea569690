"""The callbacks users name in configs (`class_path: besa_pl.callbacks.X`); they live in loop/ and eval/."""

from besa_pl.eval.fidelity import FidelityEval
from besa_pl.eval.hardware_sim import HardwareSimulation
from besa_pl.eval.perplexity import PerplexityEval
from besa_pl.eval.zero_shot import ZeroShotEval
from besa_pl.loop.block_checkpoint import BlockCheckpoint
from besa_pl.loop.blockwise_loop import BlockwiseLoop, SaveOnInterrupt
from besa_pl.quant.compressed_export import CompressedTensorsExport

__all__ = [
    "BlockCheckpoint",
    "BlockwiseLoop",
    "CompressedTensorsExport",
    "FidelityEval",
    "HardwareSimulation",
    "PerplexityEval",
    "SaveOnInterrupt",
    "ZeroShotEval",
]
