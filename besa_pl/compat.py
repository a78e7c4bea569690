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


def steps_done_in_epoch(trainer) -> int:
    """Lightning 2.6 (checked on 2.6.6): after a mid-epoch resume, the fit loop is `restarting` and
    its epoch loop's batch progress counts the batches already done; the sampler skips them."""
    if not trainer.fit_loop.restarting:
        return 0
    return trainer.fit_loop.epoch_loop.batch_progress.current.completed


class KeepCommandLineOnResume:
    """LightningCLI 2.6 (checked on 2.6.6): `_parse_ckpt_path` copies the checkpoint's hyperparameters
    over the command line. besa-pl compares them instead and refuses a mismatch, naming the setting,
    so this mixin turns the copy off."""

    def _parse_ckpt_path(self) -> None:
        pass


def lm_eval_task_config(yaml_path: str) -> dict:
    """lm-eval 0.4.13: a registered task's YAML (with `!function` entries resolved) is read by its
    private `_yaml_loader.load_yaml`; besa-pl swaps only the dataset source of that config."""
    from lm_eval.tasks._yaml_loader import load_yaml

    return dict(load_yaml(yaml_path, resolve_func=True))
