"""lm-eval task configs that read the zero-shot task files of a local data folder.

Each is lm-eval's own registered config (prompt, choices, metrics, version) with only the
dataset source swapped for a JSON file converted from a local data folder.
"""

from __future__ import annotations

import json
from pathlib import Path

from besa_pl.compat import lm_eval_task_config

TASKS = ("piqa", "boolq", "hellaswag", "winogrande", "arc_easy", "arc_challenge")


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _piqa(folder: Path) -> list[dict] | None:
    docs, labels = folder / "piqa" / "valid.jsonl", folder / "piqa" / "valid-labels.lst"
    if not (docs.exists() and labels.exists()):
        return None
    rows = _read_jsonl(docs)
    for row, label in zip(rows, labels.read_text().split()):
        row["label"] = int(label)
    return rows


def _boolq(folder: Path) -> list[dict] | None:
    path = folder / "boolq" / "val.jsonl"
    if not path.exists():
        return None
    rows = _read_jsonl(path)
    for row in rows:  # SuperGLUE stores "true"/"false"; lm-eval expects 0 = no, 1 = yes
        row["label"] = 1 if str(row["label"]).lower() == "true" else 0
    return rows


def _plain(relative: str):
    def read(folder: Path) -> list[dict] | None:
        path = folder / relative
        return _read_jsonl(path) if path.exists() else None

    return read


READERS = {
    "piqa": _piqa,
    "boolq": _boolq,
    "hellaswag": _plain("hellaswag/hellaswag_val.jsonl"),
    "winogrande": _plain("winogrande/dev.jsonl"),
    "arc_easy": _plain("arc/hf-ai2_arc/ARC-Easy-test.jsonl"),
    "arc_challenge": _plain("arc/hf-ai2_arc/ARC-Challenge-test.jsonl"),
}

# The split each task is scored on in lm-eval.
EVAL_SPLIT = {
    "piqa": "validation",
    "boolq": "validation",
    "hellaswag": "validation",
    "winogrande": "validation",
    "arc_easy": "test",
    "arc_challenge": "test",
}


def local_task_configs(task_manager, tasks: list[str], folder: Path, work: Path) -> tuple[list[dict], dict[str, str]]:
    """(configs for the tasks whose files exist, {task: reason} for those skipped). The converted files
    go into `work`, which the caller removes once the tasks have run."""
    configs, skipped = [], {}
    for name in tasks:
        rows = READERS[name](folder)
        if rows is None:
            skipped[name] = f"no local data for {name} in {folder}"
            continue
        path = work / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        config = lm_eval_task_config(task_manager, name)
        split = EVAL_SPLIT[name]
        config.update(
            dataset_path="json",
            dataset_name=None,
            dataset_kwargs={"data_files": {split: str(path)}},
            training_split=None,
            validation_split=split if split == "validation" else None,
            test_split=split if split == "test" else None,
            fewshot_split=None,
        )
        config.pop("include", None)
        configs.append(config)
    return configs, skipped
