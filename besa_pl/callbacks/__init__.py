"""The callbacks users name in configs (`class_path: besa_pl.callbacks.X`); they live in loop/ and eval/."""

from besa_pl.eval.fidelity import FidelityEval
from besa_pl.eval.hardware_sim import HardwareSimulation
from besa_pl.eval.perplexity import PerplexityEval
from besa_pl.eval.zero_shot import ZeroShotEval
from besa_pl.loop.block_checkpoint import BlockCheckpoint
from besa_pl.loop.blockwise_loop import BlockwiseLoop, SaveOnInterrupt

__all__ = ["BlockCheckpoint", "BlockwiseLoop", "FidelityEval", "HardwareSimulation", "PerplexityEval", "SaveOnInterrupt", "ZeroShotEval"]
