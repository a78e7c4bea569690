"""The documentation stays true to the code: the generated settings reference is current, the README
is a front door (short), links resolve, the flags it names exist, and the data-folder script writes
the layout besa-pl reads."""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
from pathlib import Path

import pytest

from .conftest import REPO, load_file

README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
README_MAX_LINES = 200


def load_script(name: str):
    return load_file(REPO / "scripts" / f"{name}.py")


@pytest.fixture(scope="module")
def reference():
    return load_script("settings_reference")


def test_settings_reference_is_current(reference):
    written = reference.OUTPUT.read_text(encoding="utf-8") if reference.OUTPUT.exists() else ""
    assert written == reference.render(), (
        "docs/settings.md is stale: the settings or their docstrings changed; "
        f"regenerate it with `{reference.REGENERATE}` and commit the result"
    )


def test_settings_check_flags_a_stale_file(reference, tmp_path, monkeypatch, capsys):
    stale = tmp_path / "docs" / "settings.md"
    stale.parent.mkdir()
    stale.write_text("# an old reference\n")
    monkeypatch.setattr(reference, "OUTPUT", stale)
    assert reference.main(["--check"]) == 1
    assert reference.REGENERATE in capsys.readouterr().err
    assert reference.main([]) == 0 and reference.main(["--check"]) == 0


def test_settings_reference_covers_every_setting(reference):
    text = reference.OUTPUT.read_text(encoding="utf-8")
    for name in sorted(setting_names()):
        assert f"`--{name}`" in text, f"--{name} is missing from docs/settings.md"


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines (at most {README_MAX_LINES}); move detail to docs/ and link it"
    )


# ----------------------------------------------------------------------------- links
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found, inside_code = set(), False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            inside_code = not inside_code
        elif not inside_code and line.startswith("#"):
            found.add(github_anchor(line.lstrip("#")))
    return found


def relative_links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.DOTALL)
    return [
        target for target in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", target)
    ]  # http:, https:, mailto: ...


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(path):
    broken = []
    for target in relative_links(path):
        file_part, _, fragment = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{target} (no such file)")
        elif fragment and linked.suffix == ".md" and fragment not in anchors(linked):
            broken.append(f"{target} (no heading #{fragment} in {linked.name})")
    assert not broken, f"{path.relative_to(REPO)} links to: " + "; ".join(broken)


# ----------------------------------------------------------------------------- flags
def setting_names() -> set[str]:
    """Every `model.*` / `data.*` setting the CLI takes, from the classes that define them."""
    from besa_pl.besa.pruner import BESAPruner
    from besa_pl.data.calibration import CalibrationDataModule
    from besa_pl.data.self_calibration import SelfRecipe
    from besa_pl.quant.quantizer import QuantConfig
    from besa_pl.settings import PruneSettings

    names = {
        f"model.{name}"
        for name in inspect.signature(BESAPruner.__init__).parameters
        if name not in ("self", "settings")
    }
    names |= {f"model.{field.name}" for field in dataclasses.fields(PruneSettings)}
    names |= {f"model.quant.{field.name}" for field in dataclasses.fields(QuantConfig)}
    names |= {f"data.{name}" for name in inspect.signature(CalibrationDataModule.__init__).parameters if name != "self"}
    names |= {f"data.generation.{field.name}" for field in dataclasses.fields(SelfRecipe)}
    return names


FLAG = re.compile(r"--((?:model|data)\.[A-Za-z_][\w.]*)")


@pytest.mark.parametrize(
    "path", [README, *(p for p in DOCS if p.name != "settings.md")], ids=lambda p: str(p.relative_to(REPO))
)
def test_flags_named_in_the_docs_exist(path):
    known = setting_names()
    named = {match.rstrip(".") for match in FLAG.findall(path.read_text(encoding="utf-8"))}
    wildcards = {name.removesuffix(".*") for name in named if name.endswith(".*")}
    unknown = sorted(
        name for name in named - wildcards if name not in known and not any(k.startswith(name + ".") for k in known)
    )
    assert not unknown, f"{path.relative_to(REPO)} names settings that do not exist (renamed?): " + ", ".join(
        f"--{name}" for name in unknown
    )


# ----------------------------------------------------------------------------- data folder
def test_data_folder_script_writes_what_besa_pl_reads(tmp_path):
    """The writers of scripts/make_data_folder.py, fed rows shaped like the hub's, produce files the
    product's own readers accept, at the paths they look for."""
    from besa_pl.data.calibration import LOCAL_FILES, documents
    from besa_pl.eval.zero_shot_tasks import READERS

    make = load_script("make_data_folder")
    folder = tmp_path / "data"
    written = []
    written += make.write_wikitext2(
        folder,
        {
            "test": ["", " = Title = \n", "", " Some text . \n"],
            "validation": ["", " valid line \n"],
            "train": [" train line \n"],
        },
    )
    written += make.write_ptb(
        folder,
        {
            "test": ["no it was n't black monday", "second"],
            "validation": ["valid sentence"],
            "train": ["train sentence"],
        },
    )
    document = {"text": "a document", "timestamp": "2019-04-25 12:57:54", "url": "https://example.org/a"}
    written += make.write_c4(folder, [document, {**document, "text": "another"}], [document])
    written += make.write_piqa(folder, [{"goal": "g", "sol1": "a", "sol2": "b", "label": 1}])
    written += make.write_boolq(
        folder,
        [
            {"question": "q", "passage": "t -- p", "idx": 0, "label": 1},
            {"question": "q2", "passage": "t -- p2", "idx": 1, "label": 0},
        ],
    )
    written += make.write_winogrande(folder, [{"sentence": "A _ b.", "option1": "x", "option2": "y", "answer": "2"}])
    arc_row = {"id": "Q1", "question": "?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "B"}
    written += make.write_arc(folder, {"ARC-Easy": [arc_row], "ARC-Challenge": [arc_row]})
    written += make.write_hellaswag(
        folder,
        [
            {
                "ind": 4,
                "activity_label": "x",
                "ctx_a": "a",
                "ctx_b": "b",
                "ctx": "a b",
                "endings": ["1", "2", "3", "4"],
                "source_id": "s",
                "split": "val",
                "split_type": "indomain",
                "label": "3",
            }
        ],
    )

    declared = {path for _, files in make.DATASETS.values() for path in files}
    assert set(written) == declared
    assert set(LOCAL_FILES.values()) <= declared, "a file besa-pl reads is not written by the script"

    wiki, _ = documents("wikitext2", "test", str(folder))
    assert wiki == ["", " = Title = \n", "", " Some text . \n"]  # the hub's rows, exactly
    assert documents("ptb", "test", str(folder))[0] == ["no it was n't black monday", "second"]
    assert documents("ptb", "validation", str(folder))[0] == ["valid sentence"]
    assert documents("c4", "train", str(folder))[0] == ["a document", "another"]
    assert documents("c4", "validation", str(folder))[0] == ["a document"]

    rows = {task: read(folder) for task, read in READERS.items()}
    assert all(rows[task] for task in READERS), f"tasks without local data: {[t for t in READERS if not rows[t]]}"
    assert rows["piqa"][0]["label"] == 1 and rows["piqa"][0]["goal"] == "g"
    assert [row["label"] for row in rows["boolq"]] == [1, 0]  # lm-eval's 1 = yes
    assert rows["winogrande"][0]["answer"] == "2"
    assert rows["arc_easy"][0]["answerKey"] == "B" and rows["arc_challenge"][0]["choices"]["label"] == ["A", "B"]
    assert rows["hellaswag"][0]["label"] == 3
    assert json.loads((folder / "boolq/val.jsonl").read_text().splitlines()[0])["label"] == "true"  # SuperGLUE's form
