"""Loading a compressed checkpoint from disk on CPU, whatever wrote it: the formats the ``checkpoint`` plugin
reads and the ones it refuses, with why (it registers nothing).

- ``hqq``: a directory written by hqq's ``AutoHQQHFModel.save_quantized`` (``config.json`` + ``qmodel.pt``),
  read by hqq's ``from_quantized``, whose ``torch.load`` runs with ``weights_only=True`` (no pickled code);
- ``compressed-tensors``: llm-compressor's ``save_pretrained(save_compressed=True)`` output (int or float
  quantized, packed or not), read by transformers and dequantized at load; the quantized values are then
  written into plain ``nn.Linear`` weights as the built-in llm-compressor plugins do;
- ``dense``: a plain safetensors checkpoint without a quantization config, e.g. a pruned model (compressed-
  tensors 0.19 stores sparsity densely).

Refused: GPTQ / AWQ checkpoints (``quant_method: gptq|awq``), which transformers loads only through the
``gptqmodel`` package; ``pytorch_model.bin`` checkpoints (pickle); the legacy sparse compressed-tensors formats,
which compressed-tensors 0.19 no longer decompresses; other ``quant_method``s.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from saex.plugins.compression.layer_promises import LayerPromise, quantization_promises
from saex.plugins.compression.llmcompressor_oneshot import bake_quantized_weights

if TYPE_CHECKING:
    from transformers import PreTrainedModel

Format = Literal["hqq", "compressed-tensors", "dense"]
HQQ_WEIGHTS = "qmodel.pt"
LEGACY_SPARSE = ("sparse-bitmask", "sparse-24-bitmask", "marlin-24")
GPTQMODEL = (
    "through the gptqmodel package, which cannot be installed beside saex's pins: its current release (7.7) "
    "needs torch>=2.14.1 and transformers>=5.20.2 and compiles C++ kernels from source"
)
REFUSED = {
    "gptq": f"transformers 5.17 loads GPTQ checkpoints only {GPTQMODEL} (plus optimum)",
    "awq": f"transformers 5.17 loads AWQ checkpoints only {GPTQMODEL}",
    "hqq": "transformers' HqqConfig route fails on CPU; save the model with hqq's own "
    "AutoHQQHFModel.save_quantized (config.json + qmodel.pt) instead",
}
REMEDY = (
    "Compress with llm-compressor instead (the `gptq` and `recipe` plugins run GPTQ; llm-compressor's "
    "save_pretrained(save_compressed=True) writes compressed-tensors, which loads on CPU)."
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded on CPU, or that is not a compressed version of M."""


@dataclass
class Loaded:
    """A loaded checkpoint and what its format's metadata promises per layer (bits and group layout)."""

    model: "PreTrainedModel"
    format: Format
    promises: dict[str, LayerPromise] = field(default_factory=dict)


def checkpoint_format(path: Path) -> Format:
    """Which loader reads ``path``; raises ``CheckpointError`` saying why for a format saex cannot load."""
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is not a directory")
    if (path / HQQ_WEIGHTS).is_file():
        return "hqq"
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"checkpoint {path} has no config.json (nor hqq's {HQQ_WEIGHTS})")
    if not any(path.glob("*.safetensors")):
        raise CheckpointError(
            f"checkpoint {path} has no .safetensors weights; saex does not unpickle .bin/.pt weight files "
            "(re-save it with save_pretrained, which writes safetensors)"
        )
    quantization = json.loads(config_file.read_text()).get("quantization_config")
    if quantization is None:
        return "dense"
    method = str(quantization.get("quant_method"))
    if method == "compressed-tensors":
        sparse = (quantization.get("sparsity_config") or {}).get("format")
        if sparse in LEGACY_SPARSE:
            raise CheckpointError(
                f"checkpoint {path} stores weights in the legacy sparse format {sparse!r}, which "
                "compressed-tensors 0.19 no longer decompresses; decompress it with the version that wrote it "
                "and save it dense (llm-compressor 0.14 stores pruned weights densely)"
            )
        return "compressed-tensors"
    why = REFUSED.get(method, "saex reads compressed-tensors, hqq (save_quantized) and dense checkpoints")
    raise CheckpointError(f"checkpoint {path} is quantized with quant_method {method!r}: {why}. {REMEDY}")


def load_checkpoint(path: Path, dtype: torch.dtype, device: torch.device) -> Loaded:
    """The checkpoint at ``path`` in eval mode on ``device``, floating weights in ``dtype``."""
    fmt = checkpoint_format(path)
    loaded = _load_hqq(path, dtype, device) if fmt == "hqq" else _load_transformers(path, fmt, dtype, device)
    missing = [name for name, p in loaded.model.named_parameters() if p.is_meta]
    if missing:
        raise CheckpointError(f"checkpoint {path} has no weights for {missing[:5]} ({len(missing)} tensors)")
    loaded.model.eval()
    return loaded


def _load_hqq(path: Path, dtype: torch.dtype, device: torch.device) -> Loaded:
    from hqq.core.quantize import HQQLinear
    from hqq.models.hf.base import AutoHQQHFModel

    try:
        model = AutoHQQHFModel.from_quantized(str(path), compute_dtype=dtype, device=str(device))
    except FileNotFoundError as err:  # what hqq raises for any weight file it cannot read
        raise CheckpointError(
            f"hqq could not read {path / HQQ_WEIGHTS} with torch.load(weights_only=True): it is damaged or holds "
            "more than tensors and plain values (saex never unpickles code)"
        ) from err
    promises = {
        name: LayerPromise(bits=m.meta["nbits"], group_size=m.meta["group_size"], group_axis=m.meta["axis"])
        for name, m in model.named_modules()
        if isinstance(m, HQQLinear)
    }
    return Loaded(model, "hqq", promises)


def _load_transformers(path: Path, fmt: Format, dtype: torch.dtype, device: torch.device) -> Loaded:
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    options = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if fmt == "compressed-tensors" else {}
    with warnings.catch_warnings():  # that our dequantize=True overrides the stored loading attributes
        warnings.filterwarnings("ignore", message="You passed `quantization_config`")
        model, info = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, use_safetensors=True, output_loading_info=True, **options
        )
    unmatched = {kind: keys for kind, keys in info.items() if keys and kind != "error_msgs"}
    if unmatched:
        raise CheckpointError(
            f"checkpoint {path}: transformers did not match every tensor to the model ({unmatched}); "
            "the weights it did not find would be random"
        )
    promises = {}
    if fmt == "compressed-tensors":  # transformers drops the config once it dequantized: read it from the file
        stored = json.loads((path / "config.json").read_text())["quantization_config"]
        promises = quantization_promises(model, CompressedTensorsConfig.from_dict(stored).quantization_config)
        bake_quantized_weights(model)
    return Loaded(model.to(device), fmt, promises)
