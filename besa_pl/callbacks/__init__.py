from .block_checkpoint import BlockCheckpoint
from .blockwise_loop import BlockwiseLoop, SaveOnInterrupt
from .hardware_sim import HardwareSimulation
from .perplexity import PerplexityEval
from .zero_shot import ZeroShotEval

__all__ = ["BlockCheckpoint", "BlockwiseLoop", "HardwareSimulation", "PerplexityEval", "SaveOnInterrupt", "ZeroShotEval"]
