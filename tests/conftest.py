"""Shared fixtures: tiny randomly initialised models of real transformers classes, text generated here,
and (for the tests marked `integration` only) the real data folder."""

from __future__ import annotations

import functools
import importlib.util
import os
import random
import sys
from pathlib import Path

os.environ.setdefault("MKL_DYNAMIC", "FALSE")  # before torch: the same float sums on a busy machine

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# The data folder the product reads too (BESA_DATA_DIR); next to the clone by default, as CI lays it out.
# Only tests marked `integration` read it: everything else needs nothing but the repository.
DATA_DIR = Path(os.environ.get("BESA_DATA_DIR") or os.environ.get("BESA_TEST_DATA") or REPO.parent / "shared" / "data")
WIKI_TEST = DATA_DIR / "wikitext-2-raw" / "wiki.test.raw"
NO_DATA_REASON = (
    f"integration test: the data folder is not at {DATA_DIR} (no {WIKI_TEST.relative_to(DATA_DIR)}); "
    "set BESA_DATA_DIR to a folder laid out like shared/data"
)


def pytest_collection_modifyitems(config, items):
    """Tests marked `integration` skip, with the reason, when the data folder is not there."""
    if WIKI_TEST.exists():
        return
    skip = pytest.mark.skip(reason=NO_DATA_REASON)
    for item in items:
        if item.get_closest_marker("integration"):
            item.add_marker(skip)


def require_data() -> None:
    """Skips the calling (integration) test when no data folder is there (a clone on its own has none)."""
    if not WIKI_TEST.exists():
        pytest.skip(NO_DATA_REASON)


# Words for deterministic English-like text: the words self-calibration starts a sample with
# (besa_pl.data.self_calibration.FIRST_WORDS) and a few hundred common others.
WORDS = (
    "the a an in on at of to for with by from as and but or if when while after before this that these those "
    "it he she they we i you there here what how why where one some many most all each every my our his her "
    "their its not no "
    "time year people way day man woman child world life hand part place case week company system program "
    "question work government number night point home water room mother area money story fact month lot right "
    "study book eye job word business issue side kind head house service friend father power hour game line end "
    "member law car city community name president team minute idea kid body information back parent face others "
    "level office door health person art war history party result change morning reason research girl guy moment "
    "air teacher force education river mountain village station music album song film season league player "
    "church school army battle ship road bridge island county state river north south east west century "
    "is was are were be been being have has had do does did say said make made go went take took see saw know "
    "knew get got give gave find found think thought tell told become became leave left feel felt bring brought "
    "begin began keep kept hold held write wrote stand stood hear heard let mean set meet run pay sit speak lie "
    "lead read grow lose fall send build understand draw break spend cut rise drive buy wear choose "
    "good new first last long great little own other old right big high different small large next early young "
    "important few public bad same able later second main major local national several single third "
    "about over into through during without under around among against between along across behind beyond "
    "also very often however too usually really early never always sometimes together likely simply generally "
    "instantly nearly quickly probably especially finally recently"
).split()


def generated_lines(count: int, seed: int = 0) -> list[str]:
    """`count` lines of deterministic English-like text (sentences of the words above, seeded)."""
    rng = random.Random(seed)
    lines = []
    for _ in range(count):
        sentences = []
        for _ in range(rng.randint(2, 5)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(5, 16))]
            if rng.random() < 0.3:
                words.insert(rng.randint(1, len(words) - 1), str(rng.randint(1, 2024)))
            sentence = " ".join(words)
            sentences.append(sentence[0].upper() + sentence[1:] + rng.choice([".", ".", ".", ",", "?", ";"]))
        lines.append(" ".join(sentences))
    return lines


def write_text(path: Path, count: int = 400, seed: int = 0) -> Path:
    """A calibration text file of generated lines (a few hundred lines: thousands of tokens)."""
    path.write_text("\n".join(generated_lines(count, seed)) + "\n", encoding="utf-8")
    return path


@functools.cache
def _trained_tokenizer():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        generated_lines(2000, seed=1), vocab_size=512, min_frequency=2, special_tokens=["<s>", "</s>"]
    )
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")


def tiny_tokenizer(folder: Path):
    """A byte-level BPE tokenizer (512 tokens) trained in a second on text generated here (no data folder),
    saved into `folder`."""
    tokenizer = _trained_tokenizer()
    tokenizer.save_pretrained(folder)
    return tokenizer


def tiny_config(family: str):
    from transformers import AutoConfig

    common = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    if family == "gemma":
        return AutoConfig.for_model("gemma", head_dim=16, **common)
    if family == "qwen2":
        # Mixed layer types: one sliding-window layer, so blocks receive different masks.
        return AutoConfig.for_model(
            "qwen2",
            use_sliding_window=True,
            sliding_window=16,
            max_window_layers=1,
            layer_types=["full_attention", "sliding_attention", "full_attention"],
            **common,
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
def calibration_text(tmp_path_factory):
    """A calibration text file: 400 lines of generated English-like text (about 38k tokens)."""
    return write_text(tmp_path_factory.mktemp("text") / "calibration.txt")


def write_data_folder(folder: Path, documents: int = 60, seed: int = 0) -> Path:
    """A small data folder laid out like shared/data (see besa_pl.data.calibration.LOCAL_FILES): C4 train
    documents (one JSON object a line), a C4 validation parquet, WikiText-2 and PTB test/validation files,
    all generated text."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    (folder / "c4").mkdir(parents=True, exist_ok=True)
    lines = generated_lines(documents, seed)
    # Documents of varied length: some shorter than a calibration window, most longer.
    docs = [line if rng.random() < 0.8 else line.split(".")[0] + "." for line in lines]
    (folder / "c4" / "c4_sample.jsonl").write_text(
        "".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8"
    )
    pq.write_table(pa.table({"text": generated_lines(20, seed + 1)}), folder / "c4" / "c4_validation_2k.parquet")
    (folder / "wikitext-2-raw").mkdir(exist_ok=True)
    wiki = [" "] + [f" {line} " if i % 3 else " " for i, line in enumerate(generated_lines(60, seed + 2))]
    (folder / "wikitext-2-raw" / "wiki.test.raw").write_text("\n".join(wiki) + "\n", encoding="utf-8")
    (folder / "ptb").mkdir(exist_ok=True)
    for split, offset in (("test", 3), ("valid", 4)):
        text = "\n".join(" " + line.lower().replace(".", "") for line in generated_lines(40, seed + offset))
        (folder / "ptb" / f"ptb.{split}.txt").write_text(text + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
    """A generated data folder laid out like the real one (no real data in it)."""
    return write_data_folder(tmp_path_factory.mktemp("data"))


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
        "fit",
        "--model.pretrained",
        str(model_dir),
        "--data.dataset",
        str(text),
        "--data.nsamples",
        "4",
        "--data.seqlen",
        "32",
        "--trainer.default_root_dir",
        str(root),
        "--trainer.accelerator",
        "cpu",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.logger",
        "false",
        *extra,
    ]


def load_file(path: Path):
    """Import a script of the repository (bench/, scripts/) by its path: they are not a package."""
    spec = importlib.util.spec_from_file_location(f"_{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_block(tiny_model_dir):
    """Block 1 of the tiny LLaMA with what it receives for 6 random sequences: (block, inputs, kwargs)."""
    from besa_pl.models.activations import capture_block_inputs
    from besa_pl.models.loading import decoder_blocks, load_model

    model, _ = load_model(str(tiny_model_dir("llama")))
    tokens = torch.randint(0, 512, (6, 48), generator=torch.Generator().manual_seed(0))
    cache = capture_block_inputs(model, tokens)
    block = decoder_blocks(model)[1]
    return block, cache.inputs, cache.block_kwargs[1]
