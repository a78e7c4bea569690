"""Every bad input ends with one clear line, a non-zero exit, no traceback and no finished-looking output.

The validation itself is tested where it lives (PruneSettings, the data module, the callbacks, the
model source), each message exactly; one command-line run per family of error checks that such a
message reaches the user as that one line.
"""

import json
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Callback

from besa_pl.callbacks import HardwareSimulation, PerplexityEval, ZeroShotEval
from besa_pl.data.calibration import CalibrationDataModule, calibration_tokens
from besa_pl.data.self_calibration import SelfRecipe
from besa_pl.errors import BesaError
from besa_pl.loop.trainer import blockwise_strategy
from besa_pl.models.source import ModelSource
from besa_pl.oneshot.baselines import check_shapes
from besa_pl.quant.quantizer import QuantConfig
from besa_pl.settings import PruneSettings

from .conftest import fit_args, run_cli


def run_failing(args, capsys) -> str:
    """The one `error:` line of a command that must fail with exit code 2 and no traceback."""
    with pytest.raises(SystemExit) as stop:
        run_cli(args)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def raised(make) -> str:
    with pytest.raises(BesaError) as error:
        make()
    return str(error.value)


def assert_nothing_finished(root):
    assert not (root / "sparsity.json").exists()
    assert not (root / "results.json").exists()
    assert not (root / "pruned").exists()


def callback_config(tmp_path, class_name: str, init_args: str) -> list[str]:
    path = tmp_path / "callback.yaml"
    path.write_text(
        f"trainer:\n  callbacks:\n    - class_path: besa_pl.callbacks.{class_name}\n      init_args: {init_args}\n"
    )
    return ["--config", str(path)]


# ---------------------------------------------------------------- the pruning settings (PruneSettings)

OUTSIDE_BAND = (
    "model.sparsity=0.8 is outside [0.376, 0.624], what sigmoid smoothing can reach on the uniform grid; "
    "use --model.candidate_grid centered, a larger --model.smoothing_scale or --model.smoothing false"
)

BAD_MODEL_SETTINGS = [
    (
        {"method": "prune-it"},
        "model.method=prune-it: unknown value; use one of besa, wanda, sparsegpt, magnitude, dense",
    ),
    ({"sparsity": 1.2}, "model.sparsity=1.2: must be strictly between 0 and 1 (e.g. 0.5)"),
    ({"sparsity": 0.0}, "model.sparsity=0.0: must be strictly between 0 and 1 (e.g. 0.5)"),
    ({"granularity": "column"}, "model.granularity=column: unknown value; use one of row, layer"),
    ({"structure": "2-4", "method": "wanda"}, "model.structure=2-4: write N:M with N < M, e.g. 2:4"),
    ({"structure": "4:2", "method": "wanda"}, "model.structure=4:2: write N:M with 0 < N < M, e.g. 2:4"),
    (
        {"structure": "2:4", "reconstruct": "obs_layer"},
        "model.reconstruct=obs_layer: per-row or per-layer counts break model.structure 2:4; use obs_select or obs",
    ),
    ({"structure": "2:4", "nm_lr": 0.0}, "model.nm_lr=0.0: must be positive"),
    ({"importance": "random"}, "model.importance=random: unknown value; use one of wanda, magnitude, sparsegpt"),
    ({"smoothing_scale": 0.0}, "model.smoothing_scale=0.0: must be positive"),
    ({"candidate_grid": "log"}, "model.candidate_grid=log: unknown value; use one of centered, uniform"),
    ({"sparsity": 0.8, "candidate_grid": "uniform"}, OUTSIDE_BAND),
    ({"num_candidates": 1}, "model.num_candidates=1: must be at least 2"),
    ({"penalty_weight": -1.0}, "model.penalty_weight=-1.0: must be at least 0"),
    ({"penalty_form": "squared"}, "model.penalty_form=squared: unknown value; use one of relative, absolute"),
    ({"target_mode": "dense"}, "model.target_mode=dense: unknown value; use one of pruned_input, dense_trajectory"),
    ({"optimizer": "sgd"}, "model.optimizer=sgd: unknown value; use one of prodigy, adamw"),
    ({"lr": 0.0}, "model.lr=0.0: must be positive"),
    ({"d_coef": -5.0}, "model.d_coef=-5.0: must be positive"),
    ({"epochs_per_block": 0}, "model.epochs_per_block=0: must be at least 1"),
    ({"reconstruct_swaps": -1}, "model.reconstruct_swaps=-1: must be at least 0"),
    ({"percdamp": 0.0}, "model.percdamp=0.0: must be positive"),
    ({"dtype": "int8"}, "model.dtype=int8: unknown value; use one of float32, bfloat16, float16"),
    ({"activation_dtype": "fp8"}, "model.activation_dtype=fp8: unknown value; use one of float32, bfloat16, float16"),
    ({"quant": QuantConfig(bits=5)}, "model.quant.bits=5: use one of 2, 3, 4, 8"),
    ({"quant": QuantConfig(bits=4, group_size=0)}, "model.quant.group_size=0: must be at least 1"),
    ({"quant": QuantConfig(bits=4, clip_lr=0.0)}, "model.quant.clip_lr=0.0: must be positive"),
    (
        {"reconstruct": "sgd"},
        "model.reconstruct=sgd: unknown value; use one of auto, none, obs, obs_select, obs_row, obs_layer",
    ),
    ({"reconstruct_reference": "block"}, "model.reconstruct_reference=block: unknown value; use one of layer, target"),
    ({"reconstruct_solve": "lstsq"}, "model.reconstruct_solve=lstsq: unknown value; use one of sweep, exact"),
]


@pytest.mark.parametrize(
    "settings,expected",
    BAD_MODEL_SETTINGS,
    ids=[" ".join(f"{k}={v}" for k, v in s.items()) for s, _ in BAD_MODEL_SETTINGS],
)
def test_bad_pruning_setting(settings, expected):
    assert raised(lambda: PruneSettings(**settings)) == expected


def test_the_same_settings_are_accepted_where_they_are_valid():
    """The checks above refuse only what they name: the neighbouring values pass."""
    PruneSettings(method="wanda", structure="2:4")
    PruneSettings(sparsity=0.8)  # the centered grid reaches any target
    PruneSettings(sparsity=0.8, candidate_grid="uniform", smoothing=False)
    PruneSettings(penalty_weight=0.0, reconstruct_swaps=0, quant=QuantConfig(bits=4, group_size=16))


@pytest.fixture(scope="module")
def tiny_blocks(tiny_model_dir):
    return ModelSource(str(tiny_model_dir("llama")), PruneSettings()).blocks


@pytest.mark.parametrize(
    "settings,expected",
    [
        (
            {"structure": "3:7", "method": "wanda"},
            "model.structure=3:7: block 0 self_attn.q_proj has 64 input features, not a multiple of 7; pick another N:M",
        ),
        (
            {"quant": QuantConfig(bits=4, group_size=48)},
            "model.quant.group_size=48 does not divide block 0 self_attn.q_proj's 64 input features; pick a divisor or "
            "leave it unset",
        ),
    ],
    ids=["structure 3:7", "quant.group_size 48"],
)
def test_settings_that_must_fit_the_models_shapes(settings, expected, tiny_blocks):
    assert raised(lambda: check_shapes(PruneSettings(**settings), tiny_blocks)) == expected
    check_shapes(PruneSettings(method="wanda", structure="2:4", quant=QuantConfig(bits=4, group_size=16)), tiny_blocks)


# ---------------------------------------------------------------- the data settings (CalibrationDataModule)

BAD_DATA_SETTINGS = [
    ({"nsamples": 0}, "data.nsamples=0: must be at least 1"),
    ({"seqlen": 1}, "data.seqlen=1: must be at least 2"),
    ({"batch_size": 0}, "data.batch_size=0: must be at least 1"),
    (
        {"data_dir": "/no/such/folder"},
        "data.data_dir=/no/such/folder: no such folder; give a folder laid out like the "
        "README's data folder, or leave it unset to use the Hugging Face hub",
    ),
    (
        {"generation": SelfRecipe(temperature=(0.0, 1.0))},
        "data.generation.temperature=[0.0, 1.0]: both temperatures must be positive",
    ),
    ({"generation": SelfRecipe(top_p=1.5)}, "data.generation.top_p=1.5: must be in (0, 1]"),
    (
        {"generation": SelfRecipe(filter_fraction=1.0)},
        "data.generation.filter_fraction=1.0: must be in [0, 1) (0.2 drops the 20% of samples with the highest perplexity)",
    ),
    ({"generation": SelfRecipe(batch_size=0)}, "data.generation.batch_size=0: must be at least 1"),
    ({"generation": SelfRecipe(schedule_steps=0)}, "data.generation.schedule_steps=0: must be at least 1"),
]


@pytest.mark.parametrize(
    "settings,expected",
    BAD_DATA_SETTINGS,
    ids=[" ".join(f"{k}={v}" for k, v in s.items()) for s, _ in BAD_DATA_SETTINGS],
)
def test_bad_data_setting(settings, expected):
    assert raised(lambda: CalibrationDataModule(dataset="self", **settings)) == expected


def fake_trainer(context: int, world_size: int = 1):
    pruner = SimpleNamespace(settings=PruneSettings(), context_length=lambda: context)
    return SimpleNamespace(lightning_module=pruner, world_size=world_size)


def test_calibration_windows_must_fit_the_models_context_and_split_over_the_ranks():
    data = CalibrationDataModule(dataset="self", nsamples=4, seqlen=1024)
    data.trainer = fake_trainer(512)
    assert raised(lambda: data.setup("fit")) == (
        "data.seqlen=1024 is longer than the model's context (512 tokens); lower data.seqlen"
    )
    data = CalibrationDataModule(dataset="self", nsamples=7, seqlen=32)
    data.trainer = fake_trainer(512, world_size=2)
    assert raised(lambda: data.setup("fit")) == "data.nsamples=7 does not split over 2 ranks; use a multiple of 2"


def test_calibration_sources_that_cannot_be_read(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("llama"))
    assert raised(lambda: calibration_tokens("wikitext103", tokenizer, 4, 32, 0, None)) == (
        "data.dataset=wikitext103: not c4, wikitext2, ptb, self or an existing .txt/.jsonl file"
    )
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 ".encode("latin-1") * 500)
    assert raised(lambda: calibration_tokens(str(bad), tokenizer, 4, 32, 0, None)) == (
        f"data.dataset={bad}: not UTF-8 text (invalid continuation byte at byte 3); convert it to UTF-8"
    )
    (tmp_path / "empty").mkdir()
    assert raised(lambda: calibration_tokens("c4", tokenizer, 4, 32, 0, str(tmp_path / "empty"))) == (
        f"data.dataset: the data folder {tmp_path / 'empty'} has no c4 train split (expected c4/c4_sample.jsonl); "
        "add the file, pick another dataset, or unset data_dir/BESA_DATA_DIR to use the hub"
    )
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    assert raised(lambda: calibration_tokens(str(broken), tokenizer, 4, 32, 0, None)).startswith(
        f"data.dataset={broken}: every line must be a JSON object with a 'text' field"
    )
    short = tmp_path / "short.txt"
    short.write_text("Only a few words.")
    message = raised(lambda: calibration_tokens(str(short), tokenizer, 4, 32, 0, None))
    assert message.startswith("data.dataset: the text has ") and message.endswith(
        "tokens, not more than data.seqlen=32; lower data.seqlen or add text"
    )


# ---------------------------------------------------------------- the evaluation callbacks

BAD_CALLBACK_ARGS = [
    (
        PerplexityEval,
        {"datasets": ["wikitext103"]},
        "PerplexityEval.datasets: unknown dataset 'wikitext103'; use wikitext2, c4, ptb, heldout, ptb-valid",
    ),
    (PerplexityEval, {"seqlen": 1}, "PerplexityEval.seqlen=1: must be at least 2"),
    (PerplexityEval, {"batch_size": 0}, "PerplexityEval.batch_size=0: must be at least 1"),
    (PerplexityEval, {"max_windows": 0}, "PerplexityEval.max_windows=0: must be at least 1"),
    (
        ZeroShotEval,
        {"tasks": ["mmlu"]},
        "ZeroShotEval.tasks: unknown task(s) mmlu; use piqa, boolq, hellaswag, winogrande, arc_easy, arc_challenge",
    ),
    (ZeroShotEval, {"limit": 0}, "ZeroShotEval.limit=0: must be at least 1"),
    (ZeroShotEval, {"batch_size": 0}, "ZeroShotEval.batch_size=0: must be at least 1"),
    (ZeroShotEval, {"max_length": 4}, "ZeroShotEval.max_length=4: must be at least 16"),
    (HardwareSimulation, {"pe_rows": 0}, "HardwareSimulation.pe_rows=0: must be at least 1"),
    (HardwareSimulation, {"pe_cols": 1}, "HardwareSimulation.pe_cols=1: must be at least 2"),
    (HardwareSimulation, {"theta": 1.5}, "HardwareSimulation.theta=1.5: must be between 0 and 1 (the paper's 0.5)"),
    (HardwareSimulation, {"theta_step": 0.0}, "HardwareSimulation.theta_step=0.0: must be positive"),
    (HardwareSimulation, {"tries": 0}, "HardwareSimulation.tries=0: must be at least 1"),
    (HardwareSimulation, {"latency_seqlen": 0}, "HardwareSimulation.latency_seqlen=0: must be at least 1"),
]


@pytest.mark.parametrize(
    "callback,init_args,expected", BAD_CALLBACK_ARGS, ids=[f"{c.__name__} {a}" for c, a, _ in BAD_CALLBACK_ARGS]
)
def test_bad_evaluation_setting(callback, init_args, expected):
    assert raised(lambda: callback(**init_args)) == expected


def test_evaluation_windows_must_fit_the_models_context():
    pruner = SimpleNamespace(context_length=lambda: 512)
    assert raised(lambda: PerplexityEval(seqlen=4096).setup(None, pruner, "fit")) == (
        "PerplexityEval.seqlen=4096 is longer than the model's context (512); lower it"
    )
    PerplexityEval(seqlen=512).setup(None, pruner, "fit")


def test_bad_trainer_strategy():
    assert raised(lambda: blockwise_strategy("fsdp")) == (
        "trainer.strategy=fsdp: besa-pl runs on one device (auto) or with ddp; use --trainer.strategy ddp"
    )
    from lightning.pytorch.strategies import DDPStrategy

    assert raised(lambda: blockwise_strategy(DDPStrategy())) == (
        "trainer.strategy=DDPStrategy: give the name ddp (or a besa_pl.loop.ddp.BlockwiseDDPStrategy), which prunes "
        "data-parallel"
    )


# ---------------------------------------------------------------- the model


def test_models_that_cannot_be_pruned(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from .conftest import tiny_tokenizer

    missing = tmp_path / "no-such-model"
    assert raised(lambda: ModelSource(str(missing), PruneSettings())) == (
        f"model.pretrained={missing}: no such file or folder; give a hub id, a local HF folder, a .gguf file, or one "
        "of demo, demo-gemma3, qwen2.5-coder-1.5b"
    )
    config = AutoConfig.for_model(
        "bert",
        vocab_size=512,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        is_decoder=True,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "bert")
    tiny_tokenizer(tmp_path / "bert")
    assert raised(lambda: ModelSource(str(tmp_path / "bert"), PruneSettings())) == (
        "model.pretrained: cannot find the decoder blocks of BertLMHeadModel (looked for model.layers, h, blocks); "
        "use a decoder-only LLaMA-like family (Llama, Mistral, Qwen2, Gemma...)"
    )
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf file")
    assert raised(lambda: ModelSource(str(fake), PruneSettings())) == (
        f"model.pretrained={fake} is not a GGUF file (no GGUF magic bytes); give a valid .gguf"
    )


# ---------------------------------------------------------------- end to end: one command per family

CHOICES = "besa, wanda, sparsegpt, magnitude, dense"
COMMAND_LINE_CASES = [
    # the parser: a value of the wrong type, a choice it does not know, a setting that does not exist
    ("parser type", ["--model.sparsity", "half"], "model.sparsity=half: expected float"),
    ("parser bool", ["--model.smoothing", "maybe"], "model.smoothing=maybe: expected bool"),
    ("parser bool 2", ["--model.exact_sparsity", "perhaps"], "model.exact_sparsity=perhaps: expected bool"),
    ("parser int", ["--data.seed", "zero"], "data.seed=zero: expected int"),
    ("parser top-level", ["--overwrite", "often"], "overwrite=often: expected bool"),
    ("parser choice", ["--model.method", "prune-it"], f"model.method=prune-it: unknown value; use one of {CHOICES}"),
    ("unknown setting", ["--nonsense", "1"], "unknown setting --nonsense; `besa-pl fit --help` lists the settings"),
    # a pruning setting, checked by PruneSettings; one that must fit the model's shapes
    ("model setting", ["--model.sparsity", "1.2"], "model.sparsity=1.2: must be strictly between 0 and 1 (e.g. 0.5)"),
    (
        "model shapes",
        ["--model.structure", "3:7", "--model.method", "wanda"],
        "model.structure=3:7: block 0 self_attn.q_proj has 64 input features, not a multiple of 7; pick another N:M",
    ),
    # a data setting, a nested one, and one that must fit the model's context
    ("data setting", ["--data.nsamples", "0"], "data.nsamples=0: must be at least 1"),
    (
        "nested data setting",
        ["--data.generation.temperature", "[0, 1]"],
        "data.generation.temperature=[0.0, 1.0]: both temperatures must be positive",
    ),
    (
        "data against the model",
        ["--data.seqlen", "1024"],
        "data.seqlen=1024 is longer than the model's context (512 tokens); lower data.seqlen",
    ),
    (
        "unknown dataset",
        ["--data.dataset", "wikitext103"],
        "data.dataset=wikitext103: not c4, wikitext2, ptb, self or an existing .txt/.jsonl file",
    ),
    # a trainer setting
    (
        "trainer setting",
        ["--trainer.strategy", "fsdp"],
        "trainer.strategy=fsdp: besa-pl runs on one device (auto) or with ddp; use --trainer.strategy ddp",
    ),
]


@pytest.mark.parametrize(
    "extra,expected", [case[1:] for case in COMMAND_LINE_CASES], ids=[case[0] for case in COMMAND_LINE_CASES]
)
def test_a_bad_setting_ends_the_command_with_its_one_line(
    extra, expected, tiny_model_dir, calibration_text, tmp_path, capsys
):
    line = run_failing(fit_args(tiny_model_dir("llama"), calibration_text, tmp_path, *extra), capsys)
    assert line == f"error: {expected}"
    assert_nothing_finished(tmp_path)


@pytest.mark.parametrize(
    "name,init_args,expected",
    [
        (
            "PerplexityEval",
            "{datasets: [wikitext103]}",
            "PerplexityEval.datasets: unknown dataset 'wikitext103'; use wikitext2, c4, ptb, heldout, ptb-valid",
        ),
        (
            "PerplexityEval",
            "{seqlen: 4096}",
            "PerplexityEval.seqlen=4096 is longer than the model's context (512); lower it",
        ),
    ],
    ids=["when built", "against the model"],
)
def test_a_bad_callback_setting_ends_the_command_with_its_one_line(
    name, init_args, expected, tiny_model_dir, calibration_text, tmp_path, capsys
):
    args = fit_args(tiny_model_dir("llama"), calibration_text, tmp_path)
    line = run_failing(["fit", *callback_config(tmp_path, name, init_args), *args[1:]], capsys)
    assert line == f"error: {expected}"
    assert_nothing_finished(tmp_path)


def test_a_model_path_that_does_not_exist_ends_the_command_with_its_one_line(calibration_text, tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    line = run_failing(fit_args(missing, calibration_text, tmp_path / "run"), capsys)
    assert line == (
        f"error: model.pretrained={missing}: no such file or folder; give a hub id, a local HF folder, "
        "a .gguf file, or one of demo, demo-gemma3, qwen2.5-coder-1.5b"
    )


def test_a_checkpoint_that_does_not_exist_ends_the_command_with_its_one_line(
    tiny_model_dir, calibration_text, tmp_path, capsys
):
    missing = tmp_path / "nothere.ckpt"
    args = fit_args(tiny_model_dir("llama"), calibration_text, tmp_path / "run", "--ckpt_path", str(missing))
    line = run_failing(args, capsys)
    assert line == f"error: ckpt_path={missing}: no such checkpoint; give an existing file or 'last'"
    assert_nothing_finished(tmp_path / "run")


def test_output_folder_with_a_finished_run_is_refused(tiny_model_dir, calibration_text, tmp_path, capsys):
    args = fit_args(tiny_model_dir("llama"), calibration_text, tmp_path, "--model.method", "wanda")
    run_cli(args)
    before = (tmp_path / "sparsity.json").read_text()
    line = run_failing(args, capsys)
    assert line == (
        f"error: trainer.default_root_dir={tmp_path} already holds a finished run; pass --overwrite true "
        "or choose another --trainer.default_root_dir"
    )
    assert (tmp_path / "sparsity.json").read_text() == before
    run_cli(args + ["--overwrite", "true"])
    assert (tmp_path / "sparsity.json").exists()


class PoisonTargets(Callback):
    """Test helper: make block 1's reconstruction targets NaN, as a numerical blow-up would."""

    def on_train_epoch_start(self, trainer, pruner):
        if pruner.block_index == 1:
            pruner.cache.targets[0].fill_(float("nan"))


def test_nan_loss_stops_the_block_and_keeps_the_checkpoint(tiny_model_dir, calibration_text, tmp_path, capsys):
    config = tmp_path / "poison.yaml"
    config.write_text("trainer:\n  callbacks:\n    - class_path: tests.test_bad_input.PoisonTargets\n")
    args = fit_args(tiny_model_dir("llama"), calibration_text, tmp_path)
    line = run_failing(["fit", "--config", str(config), *args[1:]], capsys)
    assert "block 1: loss became nan at step 0" in line
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["besa"]["block_index"] == 1
    assert_nothing_finished(tmp_path)
    assert not json.dumps(checkpoint["besa"]["block_logs"]).count("nan")
