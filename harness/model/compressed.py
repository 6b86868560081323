"""Compressed models: compress a copy of M, verify it layer by layer, and cache the result by content key.

The copy has its GPT-2-style Conv1D modules replaced by equal ``nn.Linear`` first (saex.model.linearize), so that
every compression reaches them; the report covers every block weight (saex.model.verify).

The cache holds the verification report and, when the compressed model is a copy of M with other weights
(pruning, quantized values written back into the weights), its state dict; loading it back is a copy of M
plus ``load_state_dict``. Models whose modules were replaced or given their own forward (HQQLinear, W8A8's
input quantization) are recompressed when needed; their report is still cached.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import BaseModel
from safetensors.torch import load_model, save_model
from torch import nn

from saex.model.linearize import conv1d_to_linear
from saex.model.verify import CompressionMismatch, clone_weights, verified_names, verify
from saex.plugin.protocols import CompressionContext, CompressionExpectation, Compressor
from saex.plugin.returns import returned
from saex.storage.cache import Cache, cache_key

COMPRESSED_VERSION = 2  # 2: every block weight reported; Conv1D made Linear first
WEIGHTS = "weights.safetensors"


@dataclass
class Compressed:
    model: nn.Module
    details: dict = field(default_factory=dict)  # compression name, seconds, per-layer report, from_cache


def _has_own_forward(module: nn.Module) -> bool:
    """An instance-level forward other than the class's own (a bound copy of it, as llm-compressor's tracing
    leaves on every module, is fine)."""
    forward = vars(module).get("forward")
    if forward is None:
        return False
    own = getattr(forward, "__func__", None)
    return getattr(own, "__qualname__", None) != type(module).forward.__qualname__


Structure = tuple[list[tuple[str, type]], list[str]]


def _structure(model: nn.Module) -> Structure:
    """Module names and types, and state-dict keys: what a state dict alone cannot change."""
    return [(n, type(m)) for n, m in model.named_modules()], list(model.state_dict())


def _reloadable(before: Structure, compressed: nn.Module) -> bool:
    """True when the uncompressed copy (of structure ``before``) plus ``compressed``'s state dict is the
    compressed model: the same module types, the same state-dict keys, and no module with a forward of its own
    (e.g. W8A8's input quantization)."""
    return _structure(compressed) == before and not any(_has_own_forward(m) for m in compressed.modules())


def compress_verified(
    cache: Cache,
    base: nn.Module,
    base_identity: dict,
    name: str,
    compressor: Compressor,
    params: BaseModel,
    ctx: CompressionContext,
    calibration_key: str,
    *,
    allow_mismatch: bool = False,
) -> Compressed:
    """M_c for ``name``, from the cache when possible. Raises ``CompressionMismatch`` (with ``.report``) when
    a layer misses what the compression promised, unless ``allow_mismatch``."""
    key = cache_key(
        {
            **base_identity,
            "compression": name,
            "compressor": compressor.name,
            "params": params.model_dump(mode="json"),
            "calibration": calibration_key,
            "seed": ctx.seed,
            "version": COMPRESSED_VERSION,
        }
    )
    path = cache.get("compressed", key)
    model = conv1d_to_linear(copy.deepcopy(base))
    if path is not None and (path / WEIGHTS).exists():
        load_model(model, path / WEIGHTS, strict=True, device=str(next(base.parameters()).device))
        return Compressed(model, {**cache.meta("compressed", key), "from_cache": True})
    before = _structure(model)
    expectation = returned(
        compressor.expectation(model, params), CompressionExpectation, compressor.name, "Compressor", "expectation"
    )
    names = verified_names(model, expectation.targets)
    originals = clone_weights(model, names)
    start = time.perf_counter()
    torch.manual_seed(ctx.seed)
    model = compressor.compress(model, params, ctx)
    details = {"compression": name, "seconds": time.perf_counter() - start}
    try:
        report = verify(model, names, expectation, originals, allow_mismatch=allow_mismatch)
    except CompressionMismatch as exc:
        exc.details = {**details, "layers": [r.model_dump() for r in exc.report]}  # type: ignore[attr-defined]
        raise
    details["layers"] = [r.model_dump() for r in report]
    # an unchanged model (`none`) is rebuilt by a copy of M in a second: no need to store M's weights again
    keep_weights = not expectation.unchanged and _reloadable(before, model)

    def write(tmp: Path) -> dict:
        if keep_weights:
            save_model(model, str(tmp / WEIGHTS))
        return details

    cache.put("compressed", key, write)
    return Compressed(model, {**details, "from_cache": False})
