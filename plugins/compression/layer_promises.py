"""Per-layer promises of a compression whose layers may differ (a recipe, a user's checkpoint), folded into the
spine's single ``CompressionExpectation``: the helper ``recipe`` and ``checkpoint`` share (it registers nothing).

``CompressionExpectation`` holds one sparsity and one quantization layout for all its targets, while an
llm-compressor recipe or a checkpoint may prune only the MLPs, quantize attention to 8 bits and the MLP to 4,
or prune every layer to its own sparsity. ``fold`` keeps a promise only where it holds for every target (bits
may differ: the largest is a promise every layer keeps); whatever it drops is still measured and stored in
the per-layer report, and every target must still have changed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from saex import CompressionExpectation, check_group_size

if TYPE_CHECKING:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig


@dataclass(frozen=True)
class LayerPromise:
    """What one layer promises; ``None`` fields promise nothing (layout as in ``CompressionExpectation``)."""

    sparsity: float | None = None
    n_m: tuple[int, int] | None = None
    bits: int | None = None
    group_size: int | None = None
    group_axis: int = 1


def fold(promises: Mapping[str, LayerPromise], tolerance: float = 0.01) -> CompressionExpectation:
    """One expectation for the layers ``promises`` names (its targets): a sparsity when every layer promises
    one within ``tolerance`` of their mean, an N:M pattern or a group layout when every layer promises the
    same, and the largest bit width when every layer shares that layout."""
    values = list(promises.values())
    sparsities = [p.sparsity for p in values]
    sparsity = None
    if values and None not in sparsities:
        mean = sum(sparsities) / len(sparsities)
        sparsity = mean if all(abs(s - mean) <= tolerance for s in sparsities) else None
    n_ms = {p.n_m for p in values}
    layouts = {(p.group_size, p.group_axis) for p in values}
    bits = [p.bits for p in values]
    quantized = len(layouts) == 1 and None not in bits and bool(bits)
    group_size, group_axis = layouts.pop() if quantized else (None, 1)
    return CompressionExpectation(
        sparsity=sparsity,
        tolerance=tolerance,
        targets=list(promises),
        n_m=n_ms.pop() if len(n_ms) == 1 else None,
        bits=max(bits) if quantized else None,
        group_size=group_size,
        group_axis=group_axis,
    )


def quantization_promises(model: nn.Module, config: "QuantizationConfig") -> dict[str, LayerPromise]:
    """The ``nn.Linear`` layers a compressed-tensors quantization config quantizes (its config groups' targets
    minus its ignore list, matched as compressed-tensors matches them), each with its weights' bits and group
    layout. Raises ``GroupSizeError`` naming a layer whose width a group size does not divide."""
    from compressed_tensors.utils import match_named_modules

    promises: dict[str, LayerPromise] = {}
    for scheme in config.config_groups.values():
        if scheme.weights is None:  # activations only: the weights keep their values
            continue
        promise = weight_promise(scheme.weights)
        for name, module in match_named_modules(model, scheme.targets, config.ignore):
            if isinstance(module, nn.Linear):
                check_group_size({name: module}, promise.group_size)
                promises[name] = promise
    return promises


def weight_promise(args: "QuantizationArgs") -> LayerPromise:
    """At most ``2**num_bits`` distinct values per quantization group, where the group layout can be checked:
    per tensor or channel (a row holds at most what the tensor holds) and runs of ``group_size`` input weights.
    2-D blocks and GPTQ's deprecated group activation ordering (groups scattered by ``g_idx``) promise nothing
    verify could check."""
    strategy, actorder = str(args.strategy), str(args.actorder)
    if actorder in ("group", "dynamic"):
        return LayerPromise()
    if strategy in ("tensor", "channel"):
        return LayerPromise(bits=args.num_bits)
    if strategy in ("group", "tensor_group"):
        return LayerPromise(bits=args.num_bits, group_size=args.group_size)
    return LayerPromise()
