"""A compressed model the user already has, as M_c: loaded from a directory (formats in ``checkpoint_formats``)
and verified against the matrix's M, which it must be a compressed version of.

Nothing is promised up front, so the expectation is measured: the checkpoint must be M's architecture with
M's config and every tensor shape (else ``CheckpointError`` naming both); its targets are the selected layers
whose weights differ from M's; a layer whose format stores quantized weights promises its bits and group
layout (compressed-tensors' scheme, hqq's per-layer meta), any other changed layer with more than 1% zeros
its measured sparsity and, when it holds in every group, the 2:4 or 4:8 pattern. The spine then re-measures
the model ``compress`` returns and reports every layer (sparsity, distinct values per group, relative error
to M). The checkpoint's file hashes are part of the params (``fingerprint``), so of every cache key.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from saex import (
    CompressionContext,
    CompressionExpectation,
    Targets,
    conv1d_to_linear,
    dense_weight,
    directory_fingerprint,
    hookimpl,
    linear_layers,
    n_m_holds,
)
from saex.plugins.compression.checkpoint_formats import CheckpointError, Loaded, load_checkpoint
from saex.plugins.compression.layer_promises import LayerPromise, fold

if TYPE_CHECKING:
    from transformers import PreTrainedModel

SPARSE = 0.01  # a changed layer with at most this share of zeros is not called sparse
# config entries that say how a model was stored or run, not what it computes
STORAGE_KEYS = {
    "_name_or_path",
    "architectures",
    "dtype",
    "torch_dtype",
    "transformers_version",
    "quantization_config",
    "use_cache",
}


class Checkpoint:
    name = "checkpoint"
    description = "a compressed model you already have (compressed-tensors, hqq, dense), verified against M"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        path: str = Field(description="directory of the compressed model (see docs/COMPRESSION.md for formats)")
        fingerprint: str | None = Field(
            None,
            description="hash of the checkpoint's files, filled in when the registry is read (so a changed "
            "checkpoint recomputes); give it to pin a checkpoint: any other one is then an error",
        )
        targets: Targets = Field(default_factory=Targets, description="which Linear layers are compared with M")

        @model_validator(mode="after")
        def _fingerprint(self) -> "Checkpoint.Params":
            directory = Path(self.path).expanduser()
            if not directory.is_dir():
                raise ValueError(f"checkpoint directory {directory} does not exist")
            found = directory_fingerprint(directory)
            if self.fingerprint is not None and self.fingerprint != found:
                raise ValueError(
                    f"checkpoint {directory} has fingerprint {found}, the registry pins {self.fingerprint}"
                )
            self.fingerprint = found
            return self

    def compress(self, model: "PreTrainedModel", params: Params, ctx: CompressionContext) -> "PreTrainedModel":
        """The checkpoint itself (``model`` is only compared with, never modified)."""
        return load_matching(model, params, ctx.device).model

    def expectation(self, model: "PreTrainedModel", params: Params) -> CompressionExpectation:
        return measured_expectation(model, load_matching(model, params, torch.device("cpu")), params.targets)


def load_matching(base: nn.Module, params: Checkpoint.Params, device: torch.device) -> Loaded:
    """The checkpoint, loaded in ``base``'s dtype with its Conv1D modules made Linear like ``base``'s, after
    checking it is what the params pinned and has ``base``'s architecture, config and tensor shapes."""
    path = Path(params.path).expanduser()
    if directory_fingerprint(path) != params.fingerprint:
        raise CheckpointError(f"checkpoint {path} changed since the registry was read (fingerprint differs)")
    loaded = load_checkpoint(path, next(base.parameters()).dtype, device)
    conv1d_to_linear(loaded.model)  # as the spine does to M's copy before compressing it (GPT-2)
    check_matches(base, loaded.model, path)
    return loaded


def check_matches(base: nn.Module, loaded: nn.Module, path: Path) -> None:
    """Raise ``CheckpointError`` naming both sides unless ``loaded`` has ``base``'s class, config (apart from
    how it was stored) and the shape of every one of ``base``'s tensors."""
    ours, theirs = type(base).__name__, type(loaded).__name__
    if ours != theirs:
        raise CheckpointError(f"checkpoint {path} is a {theirs}, but M is a {ours}: it must be a compressed M")
    mine, its = base.config.to_dict(), loaded.config.to_dict()
    differing = [
        f"{k}: checkpoint {its[k]!r}, M {mine[k]!r}"
        for k in mine.keys() - STORAGE_KEYS
        if k in its and its[k] != mine[k]
    ]
    if differing:
        raise CheckpointError(
            f"checkpoint {path} ({theirs}) has another config than M ({ours}): " + "; ".join(sorted(differing))
        )
    shapes, their_shapes = tensor_shapes(base), tensor_shapes(loaded)
    wrong = [
        f"{n}: checkpoint {their_shapes.get(n, 'missing')}, M {s}"
        for n, s in shapes.items()
        if their_shapes.get(n) != s
    ]
    if wrong:
        raise CheckpointError(f"checkpoint {path} ({theirs}) does not have M's tensor shapes: " + "; ".join(wrong[:5]))


def tensor_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Every parameter's shape by qualified name, with a quantized leaf module's dense ``weight`` (hqq's
    ``HQQLinear``) in place of its packed tensors (a whole HF model has a ``dequantize`` method too)."""
    shapes = {}
    for name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{name}." if name else ""
        if callable(getattr(module, "dequantize", None)) and next(module.children(), None) is None:
            own = {"weight": dense_weight(module, name)}
            if isinstance(getattr(module, "bias", None), torch.Tensor):
                own["bias"] = module.bias
        else:
            own = dict(module.named_parameters(recurse=False))
        shapes.update({prefix + key: tuple(tensor.shape) for key, tensor in own.items()})
    return shapes


def measured_expectation(base: nn.Module, loaded: Loaded, targets: Targets) -> CompressionExpectation:
    """What the checkpoint is, measured against ``base`` (rules in the module docstring). Raises
    ``CheckpointError`` when no selected layer differs from M."""
    promises = {}
    for name, layer in linear_layers(base, targets).items():
        weight = dense_weight(loaded.model.get_submodule(name), name)
        if torch.equal(weight, layer.weight.detach().to(weight.device, weight.dtype)):
            continue
        promises[name] = loaded.promises[name] if name in loaded.promises else sparsity_promise(weight)
    if not promises:
        raise CheckpointError(
            f"the {loaded.format} checkpoint equals M in every layer its `targets` select: it is M itself, or "
            "its compressed layers are outside the targets"
        )
    return fold(promises)


def sparsity_promise(weight: torch.Tensor) -> LayerPromise:
    """A changed, unquantized layer's measured sparsity and the 2:4 or 4:8 pattern it keeps, if any."""
    sparsity = (weight == 0).sum().item() / weight.numel()
    if sparsity <= SPARSE:
        return LayerPromise()
    for m in (4, 8):
        n = round((1 - sparsity) * m)
        if 0 < n < m and n_m_holds(weight, n, m):
            return LayerPromise(sparsity=sparsity, n_m=(n, m))
    return LayerPromise(sparsity=sparsity)


@hookimpl
def register_compressors(register):
    register(Checkpoint())
