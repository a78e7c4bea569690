from .block_checkpoint import BlockCheckpoint
from .blockwise_loop import BlockwiseLoop, SaveOnInterrupt
from .perplexity import PerplexityEval
from .zero_shot import ZeroShotEval

__all__ = ["BlockCheckpoint", "BlockwiseLoop", "PerplexityEval", "SaveOnInterrupt", "ZeroShotEval"]
