"""Write docs/settings.md, the settings reference, from the code that defines the settings.

    python scripts/settings_reference.py          # (re)write docs/settings.md
    python scripts/settings_reference.py --check  # exit 1 when docs/settings.md is stale

The sources, each the one place its settings are documented:

- `--model.*`: `besa_pl.settings.PruneSettings` (fields and the `Args:` of its docstring), plus
  `pretrained` from `BESAPruner`, which forwards every other argument to `PruneSettings`;
- `--model.quant.*`: `besa_pl.quant.quantizer.QuantConfig`;
- `--data.*`: `CalibrationDataModule.__init__` and, for `--data.generation.*`, `SelfRecipe`;
- `trainer.callbacks`: the `__init__` signature and class docstring of each callback in
  `besa_pl.callbacks.__all__`;
- besa-pl's own command-line flags: `besa_pl/cli.py` (the usage text) and the arguments
  `besa_pl/lightning_cli.py` adds to Lightning's parser.

The output depends only on those sources, so it is the same on every machine; tests/test_docs.py
fails when the file in the repository differs from what this script writes now.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import re
import sys
import types
import typing
from pathlib import Path

import docstring_parser

REPO = Path(__file__).resolve().parents[1]
OUTPUT = REPO / "docs" / "settings.md"
REGENERATE = "python scripts/settings_reference.py"


# ----------------------------------------------------------------------------- formatting
def cell(text: str) -> str:
    """One table cell: whitespace collapsed, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def format_type(hint) -> str:
    """A type hint as a config author reads it: choices for Literals, `null` for None."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is type(None):
        return "null"
    if origin is typing.Literal:
        return " | ".join(str(arg) for arg in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(format_type(arg) for arg in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(format_type(arg) for arg in args)}]" if args else name
    if dataclasses.is_dataclass(hint):
        return hint.__name__
    return getattr(hint, "__name__", str(hint))


def format_default(value) -> str:
    """A default as it would be written in a YAML config."""
    if value is inspect.Parameter.empty or value is dataclasses.MISSING:
        return "required"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_default(item) for item in value) + "]"
    if dataclasses.is_dataclass(value):
        return "see below"
    return str(value)


def arg_docs(docstring: str | None) -> dict[str, str]:
    """name -> description from a Google-style `Args:` section; `a, b: text` documents a and b."""
    found: dict[str, str] = {}
    for param in docstring_parser.parse(docstring or "").params:
        description = " ".join((param.description or "").split())
        for name in param.arg_name.split(","):
            found[name.strip().lstrip("*")] = description
    return found


def summary(docstring: str | None) -> str:
    """The docstring up to its Args/Returns/Raises section, one line per blank-line-separated paragraph."""
    text = inspect.cleandoc(docstring or "")
    text = re.split(
        r"^(?:Args|Arguments|Returns|Raises|Yields|Example|Examples):\s*$", text, maxsplit=1, flags=re.MULTILINE
    )[0]
    return "\n\n".join(" ".join(block.split()) for block in re.split(r"\n\s*\n", text) if block.strip())


def meaning(name: str, docs: dict[str, str]) -> str:
    if name in docs:
        return docs[name]
    mentioned = [other for other, text in docs.items() if re.search(rf"\b{re.escape(name)}\b", text)]
    if mentioned:
        return f"see `{mentioned[0]}`"
    return "(not documented in the docstring)"


def table(rows: list[tuple[str, str, str, str]], first: str = "setting") -> list[str]:
    lines = [f"| {first} | type | default | meaning |", "|---|---|---|---|"]
    lines += [f"| `{name}` | {cell(kind)} | `{cell(default)}` | {cell(text)} |" for name, kind, default, text in rows]
    return lines


# ----------------------------------------------------------------------------- sources
def dataclass_rows(cls, prefix: str, docs: dict[str, str] | None = None) -> list[tuple[str, str, str, str]]:
    docs = arg_docs(cls.__doc__) if docs is None else docs
    hints = typing.get_type_hints(cls)
    rows = []
    for item in dataclasses.fields(cls):
        default = item.default
        if default is dataclasses.MISSING and item.default_factory is not dataclasses.MISSING:
            default = item.default_factory()
        rows.append(
            (f"{prefix}.{item.name}", format_type(hints[item.name]), format_default(default), meaning(item.name, docs))
        )
    return rows


def signature_rows(cls, prefix: str) -> list[tuple[str, str, str, str]]:
    """The keyword arguments of cls.__init__, documented by the class docstring's Args."""
    docs = arg_docs(cls.__doc__)
    docs.update(arg_docs(cls.__init__.__doc__))
    hints = typing.get_type_hints(cls.__init__)
    rows = []
    for name, parameter in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or parameter.kind in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL):
            continue
        kind = format_type(hints[name]) if name in hints else ""
        rows.append((f"{prefix}{name}", kind, format_default(parameter.default), meaning(name, docs)))
    return rows


def added_arguments(path: Path) -> list[tuple[str, str, str, str]]:
    """`parser.add_argument("--x", type=..., default=..., help=...)` calls in a source file."""
    rows = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "add_argument"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            continue
        keywords = {keyword.arg: keyword.value for keyword in node.keywords}
        kind = ast.unparse(keywords["type"]) if "type" in keywords else ""
        default = format_default(ast.literal_eval(keywords["default"])) if "default" in keywords else "null"
        help_text = ast.literal_eval(keywords["help"]) if "help" in keywords else ""
        rows.append((node.args[0].value, kind, default, help_text))
    return rows


def usage_options(usage: str) -> list[tuple[str, str]]:
    """(flag, text) for each line of the `options:` block of `besa-pl --help`."""
    options, inside = [], False
    for line in usage.splitlines():
        if line.strip() == "options:":
            inside = True
            continue
        if inside and line.strip():
            match = re.match(r"\s+(\S.*?)\s{2,}(.*)", line)
            if match:
                options.append((match.group(1), match.group(2)))
    return options


# ----------------------------------------------------------------------------- document
def render() -> str:
    from besa_pl import callbacks as callback_module
    from besa_pl import cli
    from besa_pl.besa.pruner import BESAPruner
    from besa_pl.data.calibration import CalibrationDataModule
    from besa_pl.data.self_calibration import SelfRecipe
    from besa_pl.loop import trainer as trainer_module
    from besa_pl.quant.quantizer import QuantConfig
    from besa_pl.settings import PruneSettings

    out = [
        "# Settings reference",
        "",
        f"<!-- Generated by scripts/settings_reference.py; do not edit. Regenerate: {REGENERATE} -->",
        "",
        "Every setting is a Lightning CLI setting: write it in a config (`besa-pl fit --config cli.yaml`),",
        "or override it on the command line (`--model.sparsity 0.6`, `--data.nsamples 128`);",
        "`besa-pl fit --print_config` prints the resolved config and `besa-pl fit --help` every setting.",
        "Invalid values stop the run before any work with one line naming the setting (exit code 2).",
        "This file is generated from the code's own documentation (the classes named below); the",
        "defaults are the classes' own: `cli.yaml` and `configs/*.yaml` override some of them.",
        "",
        "## `--model.*`: the pruning settings",
        "",
        "`besa_pl.besa.pruner.BESAPruner` takes `pretrained` and forwards every other setting to",
        "`besa_pl.settings.PruneSettings`, which validates them once. " + summary(PruneSettings.__doc__),
        "",
    ]
    pruner_docs = arg_docs(BESAPruner.__doc__)
    pretrained = inspect.signature(BESAPruner.__init__).parameters["pretrained"]
    model_rows = [
        (
            "--model.pretrained",
            format_type(typing.get_type_hints(BESAPruner.__init__)["pretrained"]),
            format_default(pretrained.default),
            meaning("pretrained", pruner_docs),
        )
    ]
    model_rows += [
        (f"--{name}", kind, default, text) for name, kind, default, text in dataclass_rows(PruneSettings, "model")
    ]
    out += table(model_rows)
    out += [
        "",
        "## `--model.quant.*`: joint weight quantization",
        "",
        f"`besa_pl.quant.quantizer.QuantConfig`. {summary(QuantConfig.__doc__)}",
        "",
    ]
    out += table([(f"--{n}", k, d, t) for n, k, d, t in dataclass_rows(QuantConfig, "model.quant")])
    out += [
        "",
        "## `--data.*`: calibration data",
        "",
        f"`besa_pl.data.calibration.CalibrationDataModule`. {summary(CalibrationDataModule.__doc__)}",
        "",
    ]
    out += table(signature_rows(CalibrationDataModule, "--data."))
    out += [
        "",
        "### `--data.generation.*`: self-calibration (`--data.dataset self`)",
        "",
        f"`besa_pl.data.self_calibration.SelfRecipe`. {summary(SelfRecipe.__doc__)}",
        "",
    ]
    out += [summary(sys.modules[SelfRecipe.__module__].__doc__), ""]
    out += table([(f"--{n}", k, d, t) for n, k, d, t in dataclass_rows(SelfRecipe, "data.generation")])

    automatic = {type(callback).__name__ for callback in trainer_module.required_callbacks("root")}
    out += [
        "",
        "## `trainer.callbacks`: the loop and the evaluations",
        "",
        summary(callback_module.__doc__) + " A config lists them under `trainer.callbacks`,",
        "each as `class_path: besa_pl.callbacks.<name>` with its arguments under `init_args`;",
        "drop an evaluation to skip it. " + summary(trainer_module.complete_callbacks.__doc__),
        "",
    ]
    for name in sorted(callback_module.__all__, key=lambda n: (n in automatic, n)):
        cls = getattr(callback_module, name)
        out += [f"### `besa_pl.callbacks.{name}`", ""]
        if name in automatic:
            out += ["Added by every run (`besa_pl.loop.trainer.required_callbacks`); not for configs.", ""]
        out += [summary(cls.__doc__), ""]
        rows = signature_rows(cls, "")
        if rows and name not in automatic:
            out += table(rows, first="init_args")
            out += [""]
        elif not rows:
            out += ["No arguments.", ""]

    out += [
        "## besa-pl's own command-line flags",
        "",
        "Besides `--config FILE` (repeatable: later files override earlier ones) and",
        "`--print_config`, which are Lightning's:",
        "",
        "| flag | where | meaning |",
        "|---|---|---|",
    ]
    for flag, text in usage_options(cli.usage()):
        out.append(f"| `{cell(flag)}` | `besa-pl` | {cell(text)} |")
    lightning_cli = REPO / "besa_pl" / "lightning_cli.py"
    for flag, kind, default, text in added_arguments(lightning_cli):
        out.append(f"| `{cell(flag)}` | `besa-pl fit` ({cell(kind)}, default `{cell(default)}`) | {cell(text)} |")
    if '"last"' in lightning_cli.read_text(encoding="utf-8"):
        out.append(
            "| `--ckpt_path` | `besa-pl fit` (Lightning's) | resume from a checkpoint file; `last` means: "
            + cell(summary(trainer_module.latest_checkpoint.__doc__))
            + " |"
        )
    return "\n".join(out).rstrip() + "\n"


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/settings.md is stale; write nothing")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.exists() else ""
        if current != text:
            print(f"{_shown(OUTPUT)} is stale; regenerate it: {REGENERATE}", file=sys.stderr)
            return 1
        print(f"{_shown(OUTPUT)} is up to date")
        return 0
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {_shown(OUTPUT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
