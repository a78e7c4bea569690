"""Only the block being pruned is in memory, and streaming changes no result."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from besa_pl import BESAPruner, CalibrationDataModule
from besa_pl.eval.perplexity import perplexity, streamed_perplexity
from besa_pl.loop.trainer import make_trainer
from besa_pl.models.activations import capture_block_inputs, run_block
from besa_pl.models.loading import decoder_blocks, prunable_linears
from besa_pl.models.source import ModelSource
from besa_pl.oneshot.baselines import keep_mask_from_scores
from besa_pl.oneshot.importance import InputStatistics, wanda_scores
from besa_pl.settings import PruneSettings

from .conftest import saved_weights, tiny_config, tiny_tokenizer


@pytest.fixture(scope="module")
def deep_model(tmp_path_factory):
    """A tiny Llama with 6 blocks, in two safetensors shards, as large models come."""
    folder = tmp_path_factory.mktemp("deep-llama")
    config = tiny_config("llama")
    config.num_hidden_layers = 6
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder, max_shard_size="150KB")
    tiny_tokenizer(folder)
    assert len(list(folder.glob("*.safetensors"))) > 1
    return folder


def block_elements(folder) -> int:
    model = AutoModelForCausalLM.from_pretrained(folder)
    return sum(p.numel() for p in decoder_blocks(model)[0].parameters())


@torch.no_grad()
def whole_model_wanda_masks(folder, tokens):
    """The reference: Wanda, block after block, on the whole model held in memory."""
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    cache = capture_block_inputs(model, tokens)
    hidden = cache.inputs
    masks = {}
    for index, block in enumerate(decoder_blocks(model)):
        stats = {name: InputStatistics(linear) for name, linear in prunable_linears(block).items()}
        run_block(block, hidden, cache.block_kwargs[index], "cpu")
        for name, linear in prunable_linears(block).items():
            stats[name].remove()
            keep = keep_mask_from_scores(wanda_scores(linear.weight, stats[name].col_sq), 0.5)
            linear.weight.mul_(keep)
            masks[f"model.layers.{index}.{name}.weight"] = keep
        run_block(block, hidden, cache.block_kwargs[index], "cpu", out=hidden)
    return masks


@pytest.mark.parametrize("method", ["wanda", "besa"])
def test_pruning_holds_one_block_at_a_time(method, deep_model, calibration_text, tmp_path):
    pruner = BESAPruner(pretrained=str(deep_model), method=method, reconstruct="obs")
    data = CalibrationDataModule(dataset=str(calibration_text), nsamples=4, seqlen=32)
    make_trainer(tmp_path, accelerator="cpu", logger=False, enable_progress_bar=False).fit(pruner, datamodule=data)
    # The skeleton never had more than one block's weights read at once (out of six).
    assert pruner.source.peak_block_elements == block_elements(deep_model)
    assert all(p.device.type == "meta" for block in pruner.source.blocks for p in block.parameters())
    assert json.loads((tmp_path / "sparsity.json").read_text())["overall"] == pytest.approx(0.5, abs=1e-3)
    assert len(list((tmp_path / "pruned").glob("model-*-of-00007.safetensors"))) == 7


def test_streamed_wanda_equals_wanda_on_the_whole_model(deep_model, calibration_text, tmp_path):
    pruner = BESAPruner(pretrained=str(deep_model), method="wanda")
    data = CalibrationDataModule(dataset=str(calibration_text), nsamples=4, seqlen=32)
    make_trainer(tmp_path, accelerator="cpu", logger=False, enable_progress_bar=False).fit(pruner, datamodule=data)
    expected = whole_model_wanda_masks(deep_model, data.tokens)
    pruned = saved_weights(tmp_path / "pruned")
    assert len(expected) == 6 * 7
    for name, keep in expected.items():
        assert torch.equal(pruned[name] != 0, keep), name


def test_block_streaming_perplexity_equals_whole_model_perplexity(deep_model):
    tokenizer = AutoTokenizer.from_pretrained(deep_model)
    model = AutoModelForCausalLM.from_pretrained(deep_model).eval()
    batches = torch.randint(0, tokenizer.vocab_size, (5, 48), generator=torch.Generator().manual_seed(0))
    whole = perplexity(model, batches, batch_size=2)
    source = ModelSource(str(deep_model), PruneSettings())
    streamed = streamed_perplexity(source, deep_model, batches, "cpu", batch_size=2)
    assert streamed == pytest.approx(whole, rel=1e-5)
    assert source.peak_block_elements == block_elements(deep_model)
