"""Shared fixtures: tiny randomly initialised models of real transformers classes, and the data folder."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("MKL_DYNAMIC", "FALSE")  # before torch: the same float sums on a busy machine

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# The data folder the product reads too (BESA_DATA_DIR); next to the clone by default, as CI lays it out.
DATA_DIR = Path(os.environ.get("BESA_DATA_DIR") or os.environ.get("BESA_TEST_DATA") or REPO.parent / "shared" / "data")
WIKI_TEST = DATA_DIR / "wikitext-2-raw" / "wiki.test.raw"


def require_data() -> None:
    """Skips the calling test when no data folder is there (a clone on its own has none)."""
    if not WIKI_TEST.exists():
        pytest.skip(f"data folder not found at {DATA_DIR} (set BESA_DATA_DIR)")


def tiny_tokenizer(folder: Path):
    """A byte-level BPE tokenizer trained in milliseconds on WikiText-2 text."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    require_data()
    lines = WIKI_TEST.read_text(encoding="utf-8").splitlines()[:2000]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(lines, vocab_size=512, min_frequency=2, special_tokens=["<s>", "</s>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
    tokenizer.save_pretrained(folder)
    return tokenizer


def tiny_config(family: str):
    from transformers import AutoConfig

    common = dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
    )
    if family == "gemma":
        return AutoConfig.for_model("gemma", head_dim=16, **common)
    if family == "qwen2":
        # Mixed layer types: one sliding-window layer, so blocks receive different masks.
        return AutoConfig.for_model(
            "qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=1,
            layer_types=["full_attention", "sliding_attention", "full_attention"], **common,
        )
    if family == "mistral":
        return AutoConfig.for_model("mistral", sliding_window=16, **common)
    return AutoConfig.for_model("llama", **common)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory: family name -> folder with a randomly initialised model and a tokenizer."""
    made: dict[str, Path] = {}

    def make(family: str = "llama") -> Path:
        if family not in made:
            from transformers import AutoModelForCausalLM

            folder = tmp_path_factory.mktemp(f"tiny-{family}")
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(tiny_config(family))
            model.save_pretrained(folder)
            tiny_tokenizer(folder)
            made[family] = folder
        return made[family]

    return make


@pytest.fixture(scope="session")
def calibration_text():
    require_data()
    return WIKI_TEST


def saved_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved (possibly sharded) safetensors model folder, by name."""
    from besa_pl.models.weights import WeightStore

    store = WeightStore(folder)
    return {name: store.get(name) for name in store.files}


def run_cli(args: list[str]) -> None:
    from besa_pl.cli import main

    main(args)


def fit_args(model_dir: Path, text: Path, root: Path, *extra: str) -> list[str]:
    return [
        "fit", "--model.pretrained", str(model_dir), "--data.dataset", str(text),
        "--data.nsamples", "4", "--data.seqlen", "32", "--trainer.default_root_dir", str(root),
        "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
        *extra,
    ]
