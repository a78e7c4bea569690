from .blockwise_loop import BlockwiseLoop, SaveOnInterrupt

__all__ = ["BlockwiseLoop", "SaveOnInterrupt"]
