"""Each library internal besa-pl relies on (besa_pl/compat.py) still exists and still behaves."""

import inspect

import lightning as L
import torch
from lightning.pytorch.cli import LightningCLI
from transformers import AutoModelForCausalLM

from besa_pl.compat import (
    KeepCommandLineOnResume,
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

    config = lm_eval_task_config(TaskManager().task_index["piqa"].yaml_path)
    assert config["task"] == "piqa" and config["dataset_path"]
    assert "doc_to_text" in config and "metric_list" in config


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
