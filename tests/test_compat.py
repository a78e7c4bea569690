"""Each library internal besa-pl relies on (besa_pl/compat.py) still exists and still behaves."""

import importlib
import inspect

import lightning as L
import torch
from lightning.pytorch.cli import LightningCLI
from transformers import AutoModelForCausalLM

from besa_pl.compat import (
    KeepCommandLineOnResume,
    ResumableForLightning,
    WithoutDistributedDataParallel,
    data_unreachable_errors,
    forget_gguf_quantizer,
    lm_eval_task_config,
    steps_done_in_epoch,
)

from .conftest import tiny_config


def test_lightning_cli_still_copies_checkpoint_hyperparameters_in_the_method_we_turn_off():
    assert callable(getattr(LightningCLI, "_parse_ckpt_path", None))
    assert "_parse_ckpt_path" in KeepCommandLineOnResume.__dict__


def test_fit_loop_exposes_the_restart_position():
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert trainer.fit_loop.restarting is False
    assert trainer.fit_loop.epoch_loop.batch_progress.current.completed == 0
    assert steps_done_in_epoch(trainer) == 0


def test_lm_eval_task_yaml_loads_with_functions_resolved():
    from lm_eval.tasks import TaskManager

    manager = TaskManager()
    config = lm_eval_task_config(manager, "piqa")
    assert config["task"] == "piqa" and config["dataset_path"]
    assert "doc_to_text" in config and "metric_list" in config
    assert callable(lm_eval_task_config(manager, "hellaswag")["process_docs"])  # `!function` resolved


def test_lightning_still_calls_a_loader_resumable_by_its_private_protocol():
    from lightning.fabric.utilities.types import _Stateful
    from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop

    from besa_pl.data.calibration import ResumableLoader

    # The epoch loop decides with isinstance(loader, _Stateful); ours must match it.
    assert "_Stateful" in inspect.getsource(_TrainingEpochLoop.reset)
    assert isinstance(ResumableLoader(list(range(4))), _Stateful)
    assert issubclass(ResumableLoader, ResumableForLightning)


def test_ddp_strategy_still_wraps_the_module_in_configure_ddp_only():
    from lightning.pytorch.strategies import DDPStrategy
    from torch import nn

    from besa_pl.loop.ddp import BlockwiseDDPStrategy

    # setup() calls configure_ddp() when fitting, and configure_ddp is where the wrapper is made.
    assert "self.configure_ddp()" in inspect.getsource(DDPStrategy.setup)
    assert "_setup_model" in inspect.getsource(DDPStrategy.configure_ddp)
    assert BlockwiseDDPStrategy.configure_ddp is WithoutDistributedDataParallel.configure_ddp
    strategy = BlockwiseDDPStrategy()
    module = nn.Linear(2, 2)
    strategy.model = module
    strategy.configure_ddp()
    assert strategy.model is module  # not wrapped in DistributedDataParallel


def test_hub_errors_for_unreachable_data_are_the_ones_caught():
    import huggingface_hub
    from datasets.exceptions import DataFilesNotFoundError, DatasetNotFoundError
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    caught = data_unreachable_errors()
    for error in (
        DatasetNotFoundError,
        DataFilesNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        GatedRepoError,
        ConnectionError,
        TimeoutError,
    ):
        assert issubclass(error, caught), error
    client = importlib.import_module(type(huggingface_hub.get_session()).__module__.split(".")[0])
    assert issubclass(client.TransportError, caught)  # raised unwrapped by the hub's HTTP client
    for error in (AttributeError, TypeError, KeyError, ImportError, RuntimeError):  # programming errors
        assert not issubclass(error, caught), error


def test_a_model_without_its_gguf_quantizer_saves(tmp_path):
    from transformers import PreTrainedModel

    # save_pretrained still decides by the attribute we clear (a GGUF-loaded model sets it).
    assert "hf_quantizer" in inspect.getsource(PreTrainedModel.save_pretrained)
    model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    model.hf_quantizer = object()
    model.config.quantization_config = {"quant_method": "gguf"}
    forget_gguf_quantizer(model)
    assert model.hf_quantizer is None and not hasattr(model.config, "quantization_config")
    model.save_pretrained(tmp_path)
    assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path).lm_head.weight, model.lm_head.weight)


def test_the_kv_cache_keyword_is_one_the_model_takes_without_a_warning(tiny_model_dir):
    import warnings

    from transformers import AutoModelForCausalLM, DynamicCache

    from besa_pl.compat import kv_cache_keyword

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama")).eval()
    cache = DynamicCache()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a deprecated name warns
        model(torch.tensor([[1, 5, 7]]), use_cache=True, **{kv_cache_keyword(model): cache})
    assert cache.get_seq_length() == 3  # the model filled the cache it was given
