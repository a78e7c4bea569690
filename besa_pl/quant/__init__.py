"""Joint weight quantization: the learnable-clipping quantizer, and the packed format it saves."""
