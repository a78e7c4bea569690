"""Build the data folder besa-pl reads offline, from the Hugging Face hub.

    python scripts/make_data_folder.py DATA                      # every dataset
    python scripts/make_data_folder.py DATA --only wikitext2 piqa
    BESA_DATA_DIR=DATA pytest -q                                 # then the integration tests run
    besa-pl fit --config cli.yaml --data.data_dir DATA           # and the evaluations read it

Run it on a machine that reaches the hub (it uses the `datasets` library, a besa-pl dependency),
then copy DATA to machines that do not. It writes the layout `besa_pl/data/calibration.py`
(LOCAL_FILES) and `besa_pl/eval/zero_shot_tasks.py` (READERS) read:

    wikitext-2-raw/wiki.{test,valid,train}.raw   WikiText-2 raw, the original files' lines
    ptb/ptb.{test,valid,train}.txt               PTB (Mikolov's text), one sentence per line
    c4/c4_sample.jsonl                           the first documents of C4 en train shard 00000
    c4/c4_validation_2k.parquet                  the first 2000 documents of C4 en validation shard 00000
    piqa/valid.jsonl, piqa/valid-labels.lst      PIQA validation (the authors' format)
    boolq/val.jsonl                              BoolQ validation (SuperGLUE's format, label "true"/"false")
    winogrande/dev.jsonl, dev-labels.lst         WinoGrande (winogrande_xl) validation
    arc/hf-ai2_arc/ARC-{Easy,Challenge}-test.jsonl   ARC test (the hub's format)
    hellaswag/hellaswag_val.jsonl                HellaSwag validation

The zero-shot tasks come from the datasets lm-eval's own task configs name (baber/piqa,
aps/super_glue, allenai/winogrande, allenai/ai2_arc, Rowan/hellaswag), so a local run scores the
same items as a run that reads the hub. Files already there are kept (`--force` rewrites them);
every file is written under a temporary name and renamed when complete. MANIFEST.json records
where each file came from, its size and sha256.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

C4_TRAIN_SHARD = "en/c4-train.00000-of-01024.json.gz"
C4_VALIDATION_SHARD = "en/c4-validation.00000-of-00008.json.gz"
C4_VALIDATION_DOCUMENTS = 2000  # the perplexity protocol reads the first 1100


# ----------------------------------------------------------------------------- writing
def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    write(partial)
    os.replace(partial, path)


def write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda target: target.write_text(text, encoding="utf-8", newline="\n"))


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def write_parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows)
    _atomic_write(path, lambda target: pq.write_table(table, target))


# Each writer takes plain Python rows (what the hub gives, already loaded) and returns the paths
# it wrote, relative to the folder; tests/test_docs.py feeds them small rows and reads the result
# back with besa-pl's own readers.
def write_wikitext2(folder: Path, splits: dict[str, list[str]]) -> list[str]:
    """splits: {"test"|"validation"|"train": the hub's rows}. A hub row is one line of the original
    file with its newline; an empty row is one of the file's blank lines, which hold a lone space."""
    names = {"test": "wiki.test.raw", "validation": "wiki.valid.raw", "train": "wiki.train.raw"}
    written = []
    for split, rows in splits.items():
        relative = f"wikitext-2-raw/{names[split]}"
        write_text(folder / relative, "".join(row if row else " \n" for row in rows))
        written.append(relative)
    return written


def write_ptb(folder: Path, splits: dict[str, list[str]]) -> list[str]:
    """splits: {"test"|"validation"|"train": sentences}; written as Mikolov's files, ' sentence \\n'."""
    names = {"test": "ptb.test.txt", "validation": "ptb.valid.txt", "train": "ptb.train.txt"}
    written = []
    for split, sentences in splits.items():
        relative = f"ptb/{names[split]}"
        write_text(folder / relative, "".join(f" {sentence.strip()} \n" for sentence in sentences))
        written.append(relative)
    return written


def write_c4(folder: Path, train: list[dict], validation: list[dict]) -> list[str]:
    """C4 documents as {"text", "timestamp", "url"}: train as JSON lines, validation as parquet."""
    keep = ("text", "timestamp", "url")
    write_jsonl(folder / "c4/c4_sample.jsonl", ({key: str(doc[key]) for key in keep} for doc in train))
    write_parquet(folder / "c4/c4_validation_2k.parquet", [{key: str(doc[key]) for key in keep} for doc in validation])
    return ["c4/c4_sample.jsonl", "c4/c4_validation_2k.parquet"]


def write_piqa(folder: Path, rows: list[dict]) -> list[str]:
    """PIQA as its authors ship it: goal/sol1/sol2 per line, the labels in a separate file."""
    write_jsonl(folder / "piqa/valid.jsonl", ({"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"]} for r in rows))
    write_text(folder / "piqa/valid-labels.lst", "".join(f"{int(r['label'])}\n" for r in rows))
    return ["piqa/valid.jsonl", "piqa/valid-labels.lst"]


def write_boolq(folder: Path, rows: list[dict]) -> list[str]:
    """SuperGLUE's val.jsonl: the hub's label 1 (True) / 0 (False) as the strings "true" / "false"."""
    write_jsonl(
        folder / "boolq/val.jsonl",
        (
            {
                "question": r["question"],
                "passage": r["passage"],
                "idx": r["idx"],
                "label": "true" if int(r["label"]) == 1 else "false",
            }
            for r in rows
        ),
    )
    return ["boolq/val.jsonl"]


def write_winogrande(folder: Path, rows: list[dict]) -> list[str]:
    keep = ("sentence", "option1", "option2", "answer")
    write_jsonl(folder / "winogrande/dev.jsonl", ({key: r[key] for key in keep} for r in rows))
    write_text(folder / "winogrande/dev-labels.lst", "".join(f"{r['answer']}\n" for r in rows))
    return ["winogrande/dev.jsonl", "winogrande/dev-labels.lst"]


def write_arc(folder: Path, splits: dict[str, list[dict]]) -> list[str]:
    """splits: {"ARC-Easy"|"ARC-Challenge": the hub's test rows (id, question, choices, answerKey)}."""
    written = []
    for name, rows in splits.items():
        relative = f"arc/hf-ai2_arc/{name}-test.jsonl"
        write_jsonl(
            folder / relative,
            (
                {"id": r["id"], "question": r["question"], "choices": r["choices"], "answerKey": r["answerKey"]}
                for r in rows
            ),
        )
        written.append(relative)
    return written


def write_hellaswag(folder: Path, rows: list[dict]) -> list[str]:
    """The hub's rows, with the label as the integer the original file holds."""

    def original(row: dict) -> dict:
        row = dict(row)
        if str(row.get("label", "")).isdigit():
            row["label"] = int(row["label"])
        return row

    write_jsonl(folder / "hellaswag/hellaswag_val.jsonl", (original(r) for r in rows))
    return ["hellaswag/hellaswag_val.jsonl"]


# ----------------------------------------------------------------------------- the hub
def _load(*args, **kwargs):
    from datasets import load_dataset

    return load_dataset(*args, **kwargs)


def _rows(dataset) -> list[dict]:
    return [dict(row) for row in dataset]


def fetch_wikitext2(folder: Path, c4_train_documents: int) -> tuple[list[str], str]:
    data = _load("Salesforce/wikitext", "wikitext-2-raw-v1")
    splits = {split: list(data[split]["text"]) for split in ("test", "validation", "train")}
    return write_wikitext2(folder, splits), "hub Salesforce/wikitext wikitext-2-raw-v1"


def fetch_ptb(folder: Path, c4_train_documents: int) -> tuple[list[str], str]:
    # besa-pl's own hub source; with a `datasets` release that no longer runs loading scripts, the
    # hub's parquet conversion of the same dataset.
    attempts = [
        (("ptb_text_only", "penn_treebank"), {}, "hub ptb_text_only penn_treebank"),
        (
            ("ptb_text_only",),
            {"revision": "refs/convert/parquet", "data_dir": "penn_treebank"},
            "hub ptb_text_only penn_treebank (refs/convert/parquet)",
        ),
    ]
    errors = []
    for args, kwargs, source in attempts:
        try:
            data = _load(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - try the next source, report all at the end
            errors.append(f"{source}: {type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}")
            continue
        splits = {split: list(data[split]["sentence"]) for split in ("test", "validation", "train")}
        return write_ptb(folder, splits), source
    raise RuntimeError("; ".join(errors))


def fetch_c4(folder: Path, c4_train_documents: int) -> tuple[list[str], str]:
    train = _load("allenai/c4", data_files={"train": C4_TRAIN_SHARD}, split="train", streaming=True)
    validation = _load("allenai/c4", data_files={"validation": C4_VALIDATION_SHARD}, split="validation", streaming=True)
    train_docs = _rows(train if c4_train_documents <= 0 else train.take(c4_train_documents))
    validation_docs = _rows(validation.take(C4_VALIDATION_DOCUMENTS))
    count = "all" if c4_train_documents <= 0 else f"first {len(train_docs)}"
    return (
        write_c4(folder, train_docs, validation_docs),
        f"hub allenai/c4: {count} documents of {C4_TRAIN_SHARD}, first {len(validation_docs)} of {C4_VALIDATION_SHARD}",
    )


def fetch_piqa(folder: Path, c4_train_documents: int) -> tuple[list[str], str]:
    return write_piqa(folder, _rows(_load("baber/piqa", split="validation"))), "hub baber/piqa validation"


def fetch_boolq(folder: Path, c4_train_documents: int) -> tuple[list[str], str]:
    rows = _rows(_load("aps/super_glue", "boolq", split="validation"))
    return write_boolq(folder, rows), "hub aps/super_glue boolq validation"


def fetch_winogrande(folder: Path, c4_train_documents: int) -> tuple[list[str], str]:
    rows = _rows(_load("allenai/winogrande", "winogrande_xl", split="validation"))
    return write_winogrande(folder, rows), "hub allenai/winogrande winogrande_xl validation"


def fetch_arc(folder: Path, c4_train_documents: int) -> tuple[list[str], str]:
    splits = {name: _rows(_load("allenai/ai2_arc", name, split="test")) for name in ("ARC-Easy", "ARC-Challenge")}
    return write_arc(folder, splits), "hub allenai/ai2_arc ARC-Easy, ARC-Challenge test"


def fetch_hellaswag(folder: Path, c4_train_documents: int) -> tuple[list[str], str]:
    return write_hellaswag(
        folder, _rows(_load("Rowan/hellaswag", split="validation"))
    ), "hub Rowan/hellaswag validation"


# name -> (fetch, the files it writes: present means done)
DATASETS = {
    "wikitext2": (
        fetch_wikitext2,
        ["wikitext-2-raw/wiki.test.raw", "wikitext-2-raw/wiki.valid.raw", "wikitext-2-raw/wiki.train.raw"],
    ),
    "ptb": (fetch_ptb, ["ptb/ptb.test.txt", "ptb/ptb.valid.txt", "ptb/ptb.train.txt"]),
    "c4": (fetch_c4, ["c4/c4_sample.jsonl", "c4/c4_validation_2k.parquet"]),
    "piqa": (fetch_piqa, ["piqa/valid.jsonl", "piqa/valid-labels.lst"]),
    "boolq": (fetch_boolq, ["boolq/val.jsonl"]),
    "winogrande": (fetch_winogrande, ["winogrande/dev.jsonl", "winogrande/dev-labels.lst"]),
    "arc": (fetch_arc, ["arc/hf-ai2_arc/ARC-Easy-test.jsonl", "arc/hf-ai2_arc/ARC-Challenge-test.jsonl"]),
    "hellaswag": (fetch_hellaswag, ["hellaswag/hellaswag_val.jsonl"]),
}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="the data folder to write (BESA_DATA_DIR)")
    parser.add_argument("--only", nargs="+", choices=sorted(DATASETS), help="these datasets only")
    parser.add_argument("--force", action="store_true", help="rewrite files that are already there")
    parser.add_argument(
        "--c4-train-documents",
        type=int,
        default=1000,
        help="documents of C4 train shard 00000 to keep, from its start (1000, the excerpt the "
        "results in docs/results.md calibrated on; 0 = the whole shard, about 356k)",
    )
    args = parser.parse_args(argv)
    folder = args.folder.expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    manifest_path = folder / "MANIFEST.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    failed = []
    for name in args.only or DATASETS:
        fetch, files = DATASETS[name]
        if not args.force and all((folder / relative).exists() for relative in files):
            print(f"{name}: already there")
            continue
        print(f"{name}: downloading ...", flush=True)
        try:
            written, source = fetch(folder, args.c4_train_documents)
        except Exception as error:  # noqa: BLE001 - one dataset's failure does not stop the others
            message = (str(error).splitlines() or [""])[0][:300]
            print(f"{name}: FAILED ({type(error).__name__}: {message})", file=sys.stderr)
            failed.append(name)
            continue
        for relative in written:
            path = folder / relative
            manifest[relative] = {"source": source, "bytes": path.stat().st_size, "sha256": sha256(path)}
            print(f"  {relative}  {path.stat().st_size:,} bytes")
    write_text(manifest_path, json.dumps(dict(sorted(manifest.items())), indent=1) + "\n")
    if failed:
        print(f"not written: {', '.join(failed)} (run again with --only {' '.join(failed)})", file=sys.stderr)
        return 1
    print(f"done: BESA_DATA_DIR={folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
