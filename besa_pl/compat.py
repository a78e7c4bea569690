"""Every use of a library internal, in one place, each checked against the version named.

tests/test_compat.py exercises each one, so an upgrade that breaks it fails loudly there
instead of silently in a run. Nothing here imports a library at module level: the command's
`--help` imports this module too.
"""

from __future__ import annotations

import importlib


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


class ResumableForLightning:
    """Lightning 2.6 (checked on 2.6.6): the training epoch loop calls a loader resumable mid-epoch
    when it matches the private protocol `lightning.fabric.utilities.types._Stateful` (has
    `state_dict` and `load_state_dict`), and warns on every resume otherwise. The position itself
    lives in the fit loop (`steps_done_in_epoch`), so the loader's state is empty."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class WithoutDistributedDataParallel:
    """Lightning 2.6 (checked on 2.6.6): `DDPStrategy.setup` calls `configure_ddp` when fitting, and
    that method alone wraps the LightningModule in DistributedDataParallel (and registers its comm
    hooks). Mixed in before DDPStrategy, it keeps the process group, launcher and checkpointing and
    leaves the wrapper out; besa-pl all-reduces its gradients itself (besa_pl.ranks)."""

    def configure_ddp(self) -> None:
        pass


def kv_cache_keyword(model) -> str:
    """The name of a causal LM's KV-cache argument: transformers 5.24 renamed `past_key_values` to
    `cache` (the old name warns, and goes in 5.40); earlier 5.x releases know only the old one."""
    import inspect

    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def lm_eval_task_config(task_manager, name: str) -> dict:
    """lm-eval 0.4.13: a registered task's YAML path is the private index entry's `yaml_path`
    (`TaskManager.task_index[name]`), and the YAML (with `!function` entries resolved) is read by the
    private `_yaml_loader.load_yaml`; besa-pl swaps only the dataset source of that config."""
    from lm_eval.tasks._yaml_loader import load_yaml

    return dict(load_yaml(task_manager.task_index[name].yaml_path, resolve_func=True))


def data_unreachable_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "the hub's files could not be fetched" (offline, unknown or gated
    repository, missing file), checked on huggingface_hub 2.4 and datasets 5.2: their HTTP, offline
    and not-found errors all derive from OSError (datasets' DatasetNotFoundError from
    FileNotFoundError); the hub's HTTP client (httpx2) raises its transport errors unwrapped."""
    errors: list[type[BaseException]] = [OSError]
    for client in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(client).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(errors)
