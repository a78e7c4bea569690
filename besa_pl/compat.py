"""Every use of a library internal, in one place, each checked against the version named.

tests/test_compat.py exercises each one, so an upgrade that breaks it fails loudly there
instead of silently in a run.
"""

from __future__ import annotations


def forget_gguf_quantizer(model) -> None:
    """transformers 5.x (checked on 5.24): a GGUF-loaded model keeps `hf_quantizer` and a
    `quantization_config`, and `save_pretrained` refuses it; the weights are already dequantized."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
