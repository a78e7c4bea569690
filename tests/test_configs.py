"""Every shipped config (cli.yaml, configs/*.yaml) parses with the real command-line parser, its settings
arrive as written, and a fit with its settings runs on a tiny model (the model, the calibration size and
the evaluations' sizes made tiny; everything else as the config says, bf16 and C4 included)."""

import json
import math

import pytest
import torch
import yaml

from .conftest import REPO, run_cli, saved_weights

CONFIGS = [REPO / "cli.yaml", *sorted((REPO / "configs").glob("*.yaml"))]
# Configs documented as layered over another one: that combination is tested too.
LAYERED = [("configs/llama2-7b.yaml", "configs/besa-paper.yaml")]
CASES = [(path.relative_to(REPO).as_posix(),) for path in CONFIGS] + LAYERED
IDS = [" + ".join(case) for case in CASES]


def merged(*files: str) -> dict:
    """The configs' settings as the parser layers them: a later file's value replaces an earlier one's
    (a list, such as the callbacks, as a whole)."""
    result: dict = {}
    for file in files:
        for key, value in (yaml.safe_load((REPO / file).read_text()) or {}).items():
            if isinstance(value, dict):
                section = result.setdefault(key, {})
                for name, item in value.items():
                    if isinstance(item, dict) and isinstance(section.get(name), dict):
                        section[name] = {**section[name], **item}
                    else:
                        section[name] = item
            else:
                result[key] = value
    return result


def test_every_shipped_config_is_covered():
    shipped = {path.relative_to(REPO).as_posix() for path in CONFIGS}
    assert "cli.yaml" in shipped and len(shipped) >= 4  # cli.yaml and configs/*.yaml are all found
    assert {file for case in LAYERED for file in case} <= shipped


@pytest.mark.parametrize("files", CASES, ids=IDS)
def test_config_parses_and_its_settings_arrive_as_written(files, capsys):
    args = ["fit"] + [arg for file in files for arg in ("--config", str(REPO / file))] + ["--print_config"]
    with pytest.raises(SystemExit) as stop:
        run_cli(args)
    assert stop.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    written = merged(*files)
    for section in ("model", "data"):
        for name, value in written.get(section, {}).items():
            if isinstance(value, dict):
                for key, item in value.items():
                    assert printed[section][name][key] == item, f"{section}.{name}.{key}"
            else:
                assert printed[section][name] == value, f"{section}.{name}"
    if "seed_everything" in written:
        assert printed["seed_everything"] == written["seed_everything"]
    trainer = dict(written.get("trainer", {}))
    callbacks = trainer.pop("callbacks", None)
    for name, value in trainer.items():
        assert printed["trainer"][name] == value, f"trainer.{name}"
    if callbacks is not None:
        parsed = printed["trainer"]["callbacks"]
        assert [c["class_path"] for c in parsed] == [c["class_path"] for c in callbacks]
        for given, got in zip(callbacks, parsed, strict=True):
            for key, value in (given.get("init_args") or {}).items():
                assert got["init_args"][key] == value, f"{given['class_path']}.{key}"


# Needs the real task files (the generated data folder has none): left out of the tiny fits; its
# settings are parsed above, and a run without its data is tested in test_self_calibration.py.
NEEDS_REAL_DATA = {"ZeroShotEval"}


def tiny_callbacks(callbacks: list[dict], data_dir) -> list[dict]:
    """The config's callbacks with evaluation sizes a tiny model can take (512-token context) and the
    generated data folder; every other argument as the config gives it."""
    tiny = []
    for callback in callbacks:
        name = callback["class_path"].rsplit(".", 1)[-1]
        init_args = dict(callback.get("init_args") or {})
        if name in NEEDS_REAL_DATA:
            continue
        if name == "PerplexityEval":
            init_args.update(seqlen=64, max_windows=4, data_dir=str(data_dir))
        tiny.append({"class_path": callback["class_path"], **({"init_args": init_args} if init_args else {})})
    return tiny


@pytest.mark.parametrize("files", CASES, ids=IDS)
def test_a_fit_with_the_configs_settings_runs_on_a_tiny_model(
    files, tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("BESA_CACHE", str(tmp_path / "cache"))  # self-calibration text is cached there
    written = merged(*files)
    args = ["fit"] + [arg for file in files for arg in ("--config", str(REPO / file))]
    callbacks = written.get("trainer", {}).get("callbacks")
    if callbacks is not None:
        override = tmp_path / "tiny-callbacks.yaml"
        override.write_text(yaml.safe_dump({"trainer": {"callbacks": tiny_callbacks(callbacks, tiny_data_dir)}}))
        args += ["--config", str(override)]
    root = tmp_path / "run"
    run_cli(
        args
        + [
            "--model.pretrained",
            str(tiny_model_dir("llama")),
            "--data.data_dir",
            str(tiny_data_dir),
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
        ]
    )
    model = written.get("model", {})
    results = json.loads((root / "results.json").read_text())
    assert results["method"] == model.get("method", "besa")
    for name, value in model.items():
        if name != "pretrained" and value is not None and not isinstance(value, dict):
            assert results["settings"][name] == value, name
    weights = saved_weights(root / "pruned") if (root / "pruned").exists() else {}
    if results["method"] != "dense":
        target = model.get("sparsity", 0.5)
        report = json.loads((root / "sparsity.json").read_text())
        assert set(report["blocks"]) == {"0", "1", "2"}
        linears = [w for name, w in weights.items() if "layers" in name and name.endswith("proj.weight")]
        assert len(linears) == 21
        zeros = sum(int((w == 0).sum()) for w in linears) / sum(w.numel() for w in linears)
        assert zeros == pytest.approx(report["overall"], abs=1e-9)
        if model.get("exact_sparsity", True):
            assert report["overall"] == pytest.approx(target, abs=1e-3)
        else:  # the official floor rule ends a little below the target
            assert target - 0.02 < report["overall"] < target
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[model.get("dtype", "float32")]
        assert all(w.dtype == dtype for w in linears)
        assert all(bool(torch.isfinite(w.float()).all()) for w in weights.values())
    for callback in written.get("trainer", {}).get("callbacks", []):
        name = callback["class_path"].rsplit(".", 1)[-1]
        init_args = callback.get("init_args") or {}
        if name == "PerplexityEval":
            datasets = init_args.get("datasets", ["wikitext2"])
            assert set(results["perplexity"]) == set(datasets)
            assert all(math.isfinite(value) for value in results["perplexity"].values())
        if name == "HardwareSimulation":
            assert results["hardware"]["per_type"]
