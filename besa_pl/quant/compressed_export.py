"""The pruned (and quantized) model as a standard `compressed-tensors` checkpoint.

`compressed-tensors` is the format llm-compressor writes and transformers (with the
`compressed-tensors` package installed) and vLLM read: `AutoModelForCausalLM.from_pretrained(folder)`
loads it with no besa-pl code.

What the format can carry, with the versions this was written against (compressed-tensors 0.20,
transformers 5.24):

* Quantized + sparse (`model.quant.bits` set): `pack-quantized`, asymmetric integer weights
  (W<bits>A16; W4A16 for 4 bits), one scale and zero point per group of `group_size` input columns
  (`strategy: group`) or per output row (`strategy: channel`, group_size None). besa-pl's unsigned
  codes u in [0, 2^b - 1] with zero point z become the format's signed codes u - 2^(b-1) with zero
  point z - 2^(b-1): the dequantized weight (u - z) * scale is the same number. The sparsity is
  carried exactly inside the codes (a pruned weight is the code equal to the zero point, which
  dequantizes to exactly 0), and recorded as metadata in `sparsity_config` (format `dense`, i.e. not
  bitmask-compressed, as llm-compressor records unstructured sparsity of a quantized model).
  The scales are stored in the pruned model's dtype (what a loader casts them to anyway): with a
  float32 model the loaded weights are bit-equal to besa-pl's; with float16/bfloat16 they differ
  only by the rounding of the scale to that dtype. config.json also sets transformers' loading
  attribute `dequantize: true`: transformers 5.24 with compressed-tensors 0.20 cannot load any
  asymmetric pack-quantized checkpoint otherwise (it lays the zero points out unpacked on the meta
  model while the file holds them packed: a size mismatch); with it the weights are decompressed
  while loading, which the default path does at the first forward anyway.
* Sparse only (no quantization): the `sparse-bitmask` format is refused. compressed-tensors
  removed its sparse compressors after 0.14 (its `ModelCompressor` writes an empty
  `sparsity_config`, and a bitmask checkpoint's tensors no longer have a decompressor), and
  transformers 5 needs compressed-tensors >= 0.15 and reads no `sparsity_config`; such a folder
  would load with its pruned layers left uninitialised. The pruned/ folder is the loadable form.
* A group whose zero point falls outside [0, 2^b - 1] (possible only when every weight of the
  group has the same sign after clipping): the format stores zero points as b-bit integers, and a
  pruned zero of that group would not be representable. Refused, naming the layer.

Where the quantization parameters come from: a dict {module name: (scale, zero)} (as besa-pl's
blocks return them), or, when none is passed, the `packed/` folder the same run wrote (its
`.scale` and `.zero` tensors). Every quantized layer is checked: the library's own decompression
of the written tensors, computed in float32 and cast to the pruned dtype, must reproduce the pruned
weights exactly, so stale or mismatched parameters are refused instead of written.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.pytorch import Callback
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from besa_pl.atomic import swap_folder
from besa_pl.console import console
from besa_pl.errors import BesaError
from besa_pl.preflight import INDEX_FILE
from besa_pl.quant.quantizer import QuantConfig

EXPORT_SETTING = "CompressedTensorsExport"
CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class CompressedExport:
    """A written compressed-tensors folder: where, its bytes on disk, and the sparsity of its
    quantized layers."""

    folder: Path
    bytes: int
    sparsity: float


def check_export(quant: QuantConfig | None) -> None:
    """Refuse, before any pruning, an export the format cannot carry (for the settings' checks)."""
    if quant is None or not quant.enabled:
        raise BesaError(
            f"{EXPORT_SETTING} needs model.quant.bits: the sparse-only format "
            "(sparse-bitmask) is no longer read by transformers 5 / compressed-tensors>=0.15; set "
            "model.quant.bits=4 (pack-quantized W4A16) or use pruned/"
        )


def folder_bytes(folder: str | Path) -> int:
    """Bytes of every file under `folder`."""
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())


def _weight_files(folder: Path) -> list[Path]:
    index = folder / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    return sorted(folder.glob("*.safetensors"))


def read_packed_qparams(packed_folder: str | Path) -> tuple[QuantConfig, dict[str, tuple[Tensor, Tensor]]]:
    """(bits and group size, {module name: (scale, zero)}) from a besa-pl `packed/` folder."""
    from besa_pl.quant.packed import FORMAT

    packed_folder = Path(packed_folder)
    meta_file = packed_folder / "besa_packed.json"
    if not meta_file.exists():
        raise BesaError(
            f"{EXPORT_SETTING}: {packed_folder} has no besa_packed.json; export from the run's packed/ "
            "folder, or pass the quantization parameters"
        )
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT:
        raise BesaError(
            f"{EXPORT_SETTING}: {packed_folder} is a {meta.get('format')} folder, not {FORMAT}; "
            "rerun the pruning to rewrite packed/"
        )
    tensors: dict[str, Tensor] = {}
    for path in _weight_files(packed_folder):
        with safe_open(str(path), "pt") as handle:
            names = handle.keys()  # a safetensors handle, not a dict
            for name in names:
                if name.endswith((".scale", ".zero")):
                    tensors[name] = handle.get_tensor(name)
    qparams = {
        name.removesuffix(".scale"): (tensor, tensors[name.removesuffix(".scale") + ".zero"])
        for name, tensor in tensors.items()
        if name.endswith(".scale")
    }
    return QuantConfig(bits=meta["bits"], group_size=meta["group_size"]), qparams


def _linear_modules(folder: Path) -> set[str]:
    """Names of every nn.Linear of the folder's model (built on the meta device)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights(include_buffers=True):
        model = AutoModelForCausalLM.from_config(config)
    return {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}


def _scheme(quant: QuantConfig, targets: list[str]):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    grouped = quant.group_size is not None
    weights = QuantizationArgs(
        num_bits=quant.bits,
        type="int",
        symmetric=False,
        dynamic=False,
        strategy="group" if grouped else "channel",
        group_size=quant.group_size,
    )
    return QuantizationScheme(targets=targets, weights=weights)


def _check_grid(name: str, weight: Tensor, scale: Tensor, zero: Tensor, quant: QuantConfig) -> None:
    rows, cols = weight.shape
    qmax = 2**quant.bits - 1
    if quant.group_size is not None and cols % quant.group_size:
        raise BesaError(
            f"model.quant.group_size={quant.group_size}: compressed-tensors pack-quantized needs a group "
            f"size that divides every layer's input columns ({name} has {cols}); use a divisor of {cols}"
        )
    groups = 1 if quant.group_size is None else cols // quant.group_size
    if tuple(scale.shape) != (rows, groups) or tuple(zero.shape) != (rows, groups):
        raise BesaError(
            f"{EXPORT_SETTING}: the quantization parameters of {name} have shape {tuple(scale.shape)}, not "
            f"{(rows, groups)} (model.quant.group_size={quant.group_size}); export with the run's own "
            "settings and packed/ folder"
        )
    if not torch.equal(zero.float(), zero.float().round()) or zero.min() < 0 or zero.max() > qmax:
        raise BesaError(
            f"{EXPORT_SETTING}: {name} has zero points outside [0, {qmax}] (a group whose weights all "
            f"have one sign), which compressed-tensors stores as {quant.bits}-bit integers; keep packed/ "
            "for this model or quantize it with min-max groups that include zero"
        )


@torch.no_grad()
def _compress_linear(
    name: str,
    weight: Tensor,
    scale: Tensor,
    zero: Tensor,
    quant: QuantConfig,
    scheme,
    device: str | torch.device = "cpu",
) -> dict[str, Tensor]:
    """The layer's pack-quantized tensors (the library's compressor), checked against the weight."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.config import CompressionFormat

    compressor = BaseCompressor.get_value_from_registry(CompressionFormat.pack_quantized.value)
    _check_grid(name, weight, scale, zero, quant)
    offset = 2 ** (quant.bits - 1)  # besa-pl's codes are unsigned, the format's signed
    weight = weight.to(device)
    state = {
        "weight": weight.float(),
        "weight_scale": scale.to(device, torch.float32),
        "weight_zero_point": (zero.to(device, torch.float32) - offset).to(torch.int8),
    }
    packed = compressor.compress(state, scheme)
    restored = compressor.decompress(packed, scheme)["weight"].to(weight.dtype)
    if not torch.equal(restored, weight):
        diff = (restored.float() - weight.float()).abs().max().item()
        raise BesaError(
            f"{EXPORT_SETTING}: the quantization parameters do not reproduce the pruned weights of {name} "
            f"(largest difference {diff:.3g}); export the pruned/ and packed/ folders of the same run"
        )
    packed["weight_scale"] = scale.to(weight.dtype)  # what a loader casts it to
    return {f"{name}.{key}": value.cpu().contiguous() for key, value in packed.items()}


def write_compressed(
    pruned_folder: str | Path,
    out_folder: str | Path,
    quant: QuantConfig | None = None,
    qparams: dict[str, tuple[Tensor, Tensor]] | None = None,
    packed_folder: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> CompressedExport:
    """Write `pruned_folder` (a Hugging Face folder, pruned weights exact zeros, quantized weights
    dequantized) to `out_folder` as a compressed-tensors `pack-quantized` checkpoint.

    Args:
        pruned_folder: the run's pruned/ folder.
        out_folder: the folder to write; written beside it under a temporary name and renamed when
            complete (an older one is replaced).
        quant: bits and group size of the run; None with `packed_folder`: read from packed/.
        qparams: {module name (e.g. `model.layers.0.self_attn.q_proj`): (scale, zero)}, as besa-pl's
            quantizer returns them (per output row and group); None: read from `packed_folder`.
        packed_folder: the run's packed/ folder (default: `packed` beside `pruned_folder`), read
            only when `qparams` is None.
        device: where the layers are quantized and checked (the run's accelerator is faster).

    Raises BesaError (one line, naming the setting) for what the format cannot carry: no
    quantization (the sparse-bitmask format does not load in transformers 5), a group size that
    does not divide a layer, zero points outside the b-bit range; and for parameters that do not
    reproduce the pruned weights.
    """
    from compressed_tensors import ModelCompressor
    from compressed_tensors.base import SPARSITY_CONFIG_NAME
    from compressed_tensors.config import CompressionFormat, DenseSparsityConfig
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    pruned_folder, out_folder = Path(pruned_folder), Path(out_folder)
    if qparams is None and (quant is None or quant.enabled):
        packed_folder = Path(packed_folder) if packed_folder is not None else pruned_folder.with_name("packed")
        if packed_folder.exists():
            packed_quant, qparams = read_packed_qparams(packed_folder)
            if quant is not None and (quant.bits, quant.group_size) != (packed_quant.bits, packed_quant.group_size):
                raise BesaError(
                    f"{EXPORT_SETTING}: {packed_folder} holds bits={packed_quant.bits}, group_size="
                    f"{packed_quant.group_size}, not model.quant.bits={quant.bits}, model.quant.group_size="
                    f"{quant.group_size}; export the packed/ folder of the same run"
                )
            quant = packed_quant
    check_export(quant)
    if qparams is None:
        raise BesaError(
            f"{EXPORT_SETTING}: model.quant.bits={quant.bits} needs the quantization parameters; pass "
            f"them or export next to the run's packed/ folder (none at {packed_folder})"
        )

    config_dict = json.loads((pruned_folder / CONFIG_FILE).read_text())
    if "quantization_config" in config_dict:
        raise BesaError(
            f"{EXPORT_SETTING}: {pruned_folder} already holds a quantized model "
            f"({config_dict['quantization_config'].get('quant_method')}); export a pruned/ folder"
        )
    linears = _linear_modules(pruned_folder)
    unknown = sorted(set(qparams) - linears)
    if unknown:
        raise BesaError(
            f"{EXPORT_SETTING}: {unknown[0]} has quantization parameters but is no linear layer of the "
            "model; export the pruned/ and packed/ folders of the same run"
        )
    # Everything outside the blocks' prunable linears stays dense: embeddings and norms are not
    # Linear, and the Linear modules without quantization parameters (the LM head) are ignored.
    ignore = sorted(linears - set(qparams))
    scheme = _scheme(quant, ["Linear"])
    qconfig = QuantizationConfig(
        config_groups={"group_0": scheme},
        format=CompressionFormat.pack_quantized.value,
        quantization_status=QuantizationStatus.COMPRESSED,
        ignore=ignore,
    )

    staging = out_folder.with_name(f".{out_folder.name}.partial-{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        weight_map, total, zeros, counted, done = {}, 0, 0, 0, set()
        for path in _weight_files(pruned_folder):
            out: dict[str, Tensor] = {}
            with safe_open(str(path), "pt") as handle:
                metadata = handle.metadata() or {"format": "pt"}
                keys = handle.keys()  # a safetensors handle, not a dict
                for key in keys:
                    tensor = handle.get_tensor(key)
                    module = key.removesuffix(".weight")
                    if key.endswith(".weight") and module in qparams:
                        scale, zero = qparams[module]
                        out.update(_compress_linear(module, tensor, scale, zero, quant, scheme, device))
                        zeros += int((tensor == 0).sum())
                        counted += tensor.numel()
                        done.add(module)
                    else:
                        out[key] = tensor
            save_file(out, str(staging / path.name), metadata=metadata)
            for key, tensor in out.items():
                weight_map[key] = path.name
                total += tensor.numel() * tensor.element_size()
        missing = sorted(set(qparams) - done)
        if missing:
            raise BesaError(
                f"{EXPORT_SETTING}: {pruned_folder} has no weight for {missing[0]}, which has quantization "
                "parameters; export the pruned/ and packed/ folders of the same run"
            )
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (staging / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        for item in pruned_folder.iterdir():  # tokenizer, generation config, chat template, ...
            if item.is_file() and item.suffix != ".safetensors" and item.name != INDEX_FILE:
                shutil.copy2(item, staging / item.name)
        sparsity = zeros / max(counted, 1)
        ModelCompressor(quantization_config=qconfig).update_config(str(staging))
        config_file = staging / CONFIG_FILE
        written = json.loads(config_file.read_text())
        # The sparsity lives in the codes; recorded as metadata the way llm-compressor does for a
        # quantized model with unstructured sparsity (format dense: no bitmask to decompress).
        written["quantization_config"][SPARSITY_CONFIG_NAME] = DenseSparsityConfig(
            global_sparsity=sparsity, sparsity_structure="unstructured", targets=["Linear"], ignore=ignore
        ).model_dump()
        # transformers' loading attribute, read from config.json by CompressedTensorsConfig.from_dict:
        # decompress while loading. Without it transformers 5.24 + compressed-tensors 0.20 refuse any
        # asymmetric pack-quantized checkpoint (the zero points are laid out unpacked on the meta
        # model, packed in the file: a size mismatch). vLLM and compressed-tensors ignore the key.
        written["quantization_config"]["dequantize"] = True
        config_file.write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")
        swap_folder(staging, out_folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return CompressedExport(out_folder, folder_bytes(out_folder), sparsity)


class CompressedTensorsExport(Callback):
    """Writes ROOT/compressed/ next to pruned/ at fit end: the joint sparse + quantized model as a
    compressed-tensors `pack-quantized` checkpoint that plain `from_pretrained` loads (needs
    `--model.quant.bits`; the run's packed/ folder gives the scales and zero points).

    Args:
        folder: name of the folder written under trainer.default_root_dir.
    """

    def __init__(self, folder: str = "compressed") -> None:
        self.folder = folder

    def setup(self, trainer, pruner, stage: str) -> None:
        check_export(pruner.settings.quant)  # refuse before hours of pruning, not after

    def on_fit_end(self, trainer, pruner) -> None:
        if not trainer.is_global_zero or not pruner.settings.pruning:
            return
        root = Path(trainer.default_root_dir)
        export = write_compressed(
            root / "pruned",
            root / self.folder,
            pruner.settings.quant,
            packed_folder=root / "packed",
            device=trainer.strategy.root_device,
        )
        sizes = pruner.results.setdefault("bytes", {})
        sizes["compressed"] = export.bytes
        console.print(
            f"compressed-tensors model written to {export.folder} ({export.bytes:,} bytes on disk"
            + (f"; fp16 would be {sizes['fp16']:,})" if "fp16" in sizes else ")")
        )
