"""Check, layer by layer, that a compression did what it promised.

A compressor states a ``CompressionExpectation`` (saex.plugin.protocols); after it ran, the spine measures every
weight of the decoder blocks and every target (``layer_report``) and compares (``check_expectation``). A layer
that silently stayed dense -- the paper's reference code never wrote its pruned MLP weights back -- then stops
the cell with ``CompressionMismatch`` instead of producing results for a model that was not compressed as
labelled. The report counts every block weight whatever holds it (Linear, a module that replaced it, an MoE's
3-D expert parameters), so an untouched weight shows as dense even when no compression targeted it.

A weight is named by its module when a module holds it (``model.layers.0.mlp.down_proj``: Linear, HQQLinear,
an MoE router) and by its parameter otherwise (``model.layers.0.mlp.experts.gate_up_proj``, [experts, out, in]).
``Targets`` is the shared selection of weights; compression plugins embed it as a params field so that every
method selects weights the same way. Methods that handle ``nn.Linear`` only take ``linear_layers``, which
refuses a selection holding anything else.

Weights are read densely (``dense_weight``): a module that replaced ``nn.Linear`` (hqq's ``HQQLinear``) is
dequantized. Quantization groups (``quant_groups``) follow the usual layout: ``group_axis=1`` cuts each
output row into runs of ``group_size`` consecutive input weights (llm-compressor, hqq ``axis=1``);
``group_axis=0`` is hqq's ``axis=0`` layout, the columns of ``weight.reshape(group_size, -1)``. A 3-D weight
is checked as the matrix of all its experts' rows.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from saex.model.layouts import decoder_layers, default_targets, layout_of
from saex.plugin.protocols import CompressionExpectation


class Targets(BaseModel):
    """Which weights a compression touches, by regex on their qualified names (module docstring).

    A weight is targeted when its name fully matches one ``include`` pattern and no ``exclude`` pattern.
    The default is the model's layout's block weights (docs/MODELS.md): every attention and MLP weight of
    every decoder block, fused ones included, never embeddings or the LM head.
    """

    model_config = ConfigDict(extra="forbid")

    include: list[str] | None = Field(
        default=None,
        description="regexes (full match) on qualified weight names, e.g. 'model.layers.3.mlp.down_proj'; "
        "null: the block weights of the model's layout",
    )
    exclude: list[str] = Field(
        default=[r".*lm_head", r".*embed.*"],
        description="regexes (full match) of weights never touched, even when an include pattern matches",
    )

    @field_validator("include", "exclude")
    @classmethod
    def _compiles(cls, patterns: list[str] | None) -> list[str] | None:
        for pattern in patterns or []:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"{pattern!r} is not a valid regular expression: {err}") from None
        return patterns

    def select(self, model: nn.Module) -> list[str]:
        """Names of the model's weights these patterns select, in module order; ``NoTargetsError`` if none."""
        include = self.include if self.include is not None else [default_targets(model)]
        names = [
            name
            for name in weight_names(model)
            if any(re.fullmatch(p, name) for p in include) and not any(re.fullmatch(p, name) for p in self.exclude)
        ]
        if not names:
            found = weight_names(model)
            raise NoTargetsError(
                f"no weight matches include={include} exclude={self.exclude}; the model's weights include "
                f"{found[:5]}" + (" ..." if len(found) > 5 else "")
            )
        return names


class NoTargetsError(ValueError):
    """The target patterns selected no weight: a compression would silently do nothing."""


class NotLinearError(ValueError):
    """Targets a compression cannot handle: not ``nn.Linear`` for a Linear-only method (MoE experts), or a
    transposed Conv1D weight."""


def _holds_weight(module: nn.Module) -> bool:
    """A module with a weight matrix, or a leaf that dequantizes one (HQQLinear; a transformers model has a
    ``dequantize`` method too, and children)."""
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() >= 2:
        return True
    return callable(getattr(module, "dequantize", None)) and not any(module.children())


def weight_names(module: nn.Module, prefix: str = "") -> list[str]:
    """Qualified names of every weight matrix under ``module``, in module order (naming in the module docstring;
    norms and biases are not weights)."""
    names = []
    for name, child in module.named_children():
        qualified = f"{prefix}{name}"
        if _holds_weight(child):
            names.append(qualified)
            continue
        names += [f"{qualified}.{p}" for p, tensor in child.named_parameters(recurse=False) if tensor.dim() >= 2]
        names += weight_names(child, f"{qualified}.")
    return names


def block_weight_names(model: nn.Module) -> list[str]:
    """Every weight of the model's decoder blocks: what a compression's "50%" is a share of."""
    return weight_names(decoder_layers(model), f"{layout_of(model).blocks}.")


def verified_names(model: nn.Module, targets: Iterable[str]) -> list[str]:
    """What the spine reports on after a compression: every block weight, then any target outside the blocks."""
    names = block_weight_names(model)
    known = set(names)
    return names + [t for t in targets if t not in known]


def target_weights(model: nn.Module, targets: Targets | None = None) -> dict[str, nn.Parameter]:
    """The weights ``targets`` (default ``Targets()``) selects, as live [..., out, in] parameters (whatever
    holds them). Refuses GPT-2's ``Conv1D``, which stores [in, out]: the spine converts it first
    (``saex.model.linearize.conv1d_to_linear``)."""
    from transformers.pytorch_utils import Conv1D

    names = (targets or Targets()).select(model)
    transposed = [name for name in names if isinstance(_module(model, name), Conv1D)]
    if transposed:
        raise NotLinearError(
            f"{transposed[0]} is a Conv1D, whose weight is stored [in, out]: convert the model with "
            "saex.model.linearize.conv1d_to_linear first (the runner does, before every compression)"
        )
    return {name: _parameter(model, name) for name in names}


def linear_layers(model: nn.Module, targets: Targets | None = None) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules ``targets`` (default ``Targets()``) selects, by qualified name, in module order.
    Raises ``NoTargetsError`` when nothing matches and ``NotLinearError`` when a selected weight is held by
    anything but an ``nn.Linear``: a Linear-only method would leave it untouched."""
    names = (targets or Targets()).select(model)
    modules = {name: _module(model, name) for name in names}
    others = [f"{name} ({_describe(model, name)})" for name, m in modules.items() if not isinstance(m, nn.Linear)]
    if others:
        raise NotLinearError(
            f"this compression handles nn.Linear weights only, and {len(others)} target(s) are not: "
            f"{', '.join(others[:3])}" + (" ..." if len(others) > 3 else "") + ". Use a method that handles "
            "them (magnitude prunes any weight) or leave them out with targets.exclude (the per-layer report "
            "then shows them dense)"
        )
    return modules  # type: ignore[return-value]


def _module(model: nn.Module, name: str) -> nn.Module | None:
    """The module holding weight ``name``; None for a bare parameter."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _parameter(model: nn.Module, name: str) -> nn.Parameter:
    module = _module(model, name)
    return model.get_parameter(name) if module is None else module.weight


def _describe(model: nn.Module, name: str) -> str:
    module = _module(model, name)
    if module is not None:
        return type(module).__name__
    owner = model.get_submodule(name.rpartition(".")[0])
    return f"a {model.get_parameter(name).dim()}-D parameter of {type(owner).__name__}"


class LayerReport(BaseModel):
    """What one layer's weight looks like after compression."""

    model_config = ConfigDict(extra="forbid")

    name: str
    shape: tuple[int, ...]
    n_params: int
    sparsity: float  # fraction of exact zeros in the weight
    rel_error: float | None = None  # ||W - W0|| / ||W0|| (Frobenius) when the original weight was given
    module_type: str | None = None  # what holds the weight (Linear, HQQLinear, "a 3-D parameter of MixtralExperts")
    n_m_ok: bool | None = None  # every group of m input weights has <= n non-zeros (when N:M was promised)
    max_distinct_per_group: int | None = None  # most distinct values in one quantization group (when promised)


class CompressionMismatch(RuntimeError):
    """A compression did not do what its expectation promised in at least one layer."""

    def __init__(self, problems: list[str], report: list[LayerReport]):
        self.problems = problems
        self.report = report
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(
            f"compression did not do what it promised ({len(problems)} problem(s) over {len(report)} "
            f"layer(s)):\n{lines}\n"
            "Pass allow_mismatch=True to verify() to keep the model anyway (the layer report is still recorded)."
        )


class GroupSizeError(ValueError):
    """A quantization group size does not divide a targeted layer's width; names the first such layer."""


def check_group_size(layers: Mapping[str, nn.Module], group_size: int | None, axis: int = 1) -> None:
    """Raise ``GroupSizeError`` naming the layer when ``group_size`` does not divide its input width
    (``axis=1``) or output width (``axis=0``); ``None`` (one group per channel) always fits."""
    if group_size is None:
        return
    for name, layer in layers.items():
        out_features, in_features = dense_weight(layer, name).shape
        width, which = (in_features, "input") if axis == 1 else (out_features, "output")
        if width % group_size:
            divisors = [d for d in range(8, width + 1, 8) if width % d == 0]
            raise GroupSizeError(
                f"group_size {group_size} does not divide the {which} width {width} of layer {name} "
                f"(shape {out_features}x{in_features}); group sizes that fit (multiples of 8): {divisors}"
            )


def clone_weights(
    model: nn.Module, names: Iterable[str], device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """Copies of the named modules' weights (on ``device``, CPU by default), to pass as ``originals``."""
    return {name: _weight(model, name).detach().to(device, copy=True) for name in names}


def dense_weight(module: nn.Module, name: str = "module") -> torch.Tensor:
    """The module's weight as a dense [out, in] tensor: ``dequantize()`` when the module has one (hqq's
    ``HQQLinear``, whose ``weight`` is an empty placeholder), else its ``weight`` tensor (``nn.Linear``)."""
    dequantize = getattr(module, "dequantize", None)
    if callable(dequantize):
        with torch.no_grad():
            return dequantize().detach()
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.detach()
    raise TypeError(
        f"{name} is a {type(module).__name__} without a dense `weight` tensor or a `dequantize()` method; "
        "verification reads dense weights (a compression that replaces modules must expose one of them)"
    )


def layer_report(
    model: nn.Module,
    names: Iterable[str],
    originals: Mapping[str, torch.Tensor] | None = None,
    expectation: CompressionExpectation | None = None,
) -> list[LayerReport]:
    """Measure each named weight; ``rel_error`` is filled for names present in ``originals``,
    ``n_m_ok`` and ``max_distinct_per_group`` when ``expectation`` promises an N:M pattern or a bit width."""
    reports = []
    for name in names:
        weight = _weight(model, name)
        rows = weight.reshape(-1, weight.shape[-1])  # a 3-D expert weight: every expert's output rows
        original = originals.get(name) if originals is not None else None
        n_m = expectation.n_m if expectation is not None else None
        bits = expectation.bits if expectation is not None else None
        reports.append(
            LayerReport(
                name=name,
                shape=tuple(weight.shape),
                n_params=weight.numel(),
                sparsity=(weight == 0).sum().item() / max(weight.numel(), 1),
                rel_error=None if original is None else _rel_error(weight, original),
                module_type=_describe(model, name),
                n_m_ok=None if n_m is None else n_m_holds(rows, *n_m),
                max_distinct_per_group=None
                if bits is None
                else max_distinct_per_group(rows, expectation.group_size, expectation.group_axis),
            )
        )
    return reports


def n_m_holds(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every run of ``m`` consecutive input weights of every output row has at most ``n`` non-zeros
    (False too when ``m`` does not divide the input width: the pattern cannot hold)."""
    if weight.dim() != 2 or weight.shape[1] % m:
        return False
    nonzero = (weight != 0).reshape(weight.shape[0], -1, m).sum(dim=2)
    return bool((nonzero <= n).all())


def quant_groups(weight: torch.Tensor, group_size: int | None, axis: int = 1) -> torch.Tensor:
    """The weight as [n_groups, group_size], one row per quantization group (layout in the module docstring);
    ``group_size=None`` means one group per output row (``axis=1``) or per input column (``axis=0``)."""
    if weight.dim() != 2:
        raise ValueError(f"quantization groups need a 2-d weight, got shape {tuple(weight.shape)}")
    if group_size is None:
        return weight if axis == 1 else weight.t()
    if weight.numel() % group_size:
        raise ValueError(f"group size {group_size} does not divide the {weight.numel()} weights")
    return weight.reshape(-1, group_size) if axis == 1 else weight.reshape(group_size, -1).t()


def max_distinct_per_group(weight: torch.Tensor, group_size: int | None, axis: int = 1) -> int:
    """The largest number of distinct values found in one quantization group."""
    try:
        groups = quant_groups(weight, group_size, axis)
    except ValueError:
        return weight.numel()  # no valid grouping: report the worst case, the check then fails
    ordered = groups.sort(dim=1).values
    distinct = 1 + (ordered[:, 1:] != ordered[:, :-1]).sum(dim=1)
    return int(distinct.max().item()) if distinct.numel() else 0


def check_expectation(report: list[LayerReport], expectation: CompressionExpectation) -> list[str]:
    """Human-readable problems, one per failing layer; empty when the compression kept its promise.

    Checked: every name in ``expectation.targets`` is in the report; when a sparsity is promised, every
    target (every reported layer if no targets are named) is within ``tolerance`` of it; when none is
    promised, every target whose original was given must have changed (a sparsity check already implies it);
    when an N:M pattern is promised, it holds in every group; when a bit width is promised, no quantization
    group holds more than ``2**bits`` distinct values; when ``unchanged`` is promised, no weight moved.
    """
    by_name = {r.name: r for r in report}
    problems = [
        f"{name}: not in the layer report (a promised target was not measured)"
        for name in expectation.targets
        if name not in by_name
    ]
    checked = [by_name[n] for n in expectation.targets if n in by_name] if expectation.targets else report
    for layer in checked:
        if expectation.sparsity is not None:
            gap = layer.sparsity - expectation.sparsity
            if abs(gap) > expectation.tolerance:
                if layer.sparsity == 0:
                    why = "layer stayed dense"
                else:
                    why = "over-pruned" if gap > 0 else "under-pruned"
                problems.append(
                    f"{layer.name}: sparsity {layer.sparsity:.3f}, expected {expectation.sparsity:.3f} "
                    f"± {expectation.tolerance:.3f} ({why})"
                )
        elif layer.rel_error == 0.0 and layer.name in expectation.targets:
            problems.append(f"{layer.name}: weights bit-equal to the original (layer was not compressed)")
        if expectation.unchanged and layer.rel_error:  # None: no original to compare with
            problems.append(
                f"{layer.name}: weights changed (relative error {layer.rel_error:.3g}), "
                "though the compression promised to leave the model unchanged"
            )
        if expectation.n_m is not None and layer.n_m_ok is False:
            n, m = expectation.n_m
            problems.append(
                f"{layer.name}: {n}:{m} pattern broken (a group of {m} input weights has more "
                f"than {n} non-zeros, or {m} does not divide the input width {layer.shape[-1]})"
            )
        if expectation.bits is not None and layer.max_distinct_per_group is not None:
            limit = 2**expectation.bits
            if layer.max_distinct_per_group > limit:
                group = "per output row" if expectation.group_size is None else f"of {expectation.group_size}"
                problems.append(
                    f"{layer.name}: a quantization group {group} holds {layer.max_distinct_per_group} distinct "
                    f"values, more than 2^{expectation.bits} = {limit} (not quantized to {expectation.bits} bits)"
                )
    return problems


def verify(
    model: nn.Module,
    names: Iterable[str],
    expectation: CompressionExpectation,
    originals: Mapping[str, torch.Tensor] | None = None,
    allow_mismatch: bool = False,
) -> list[LayerReport]:
    """Report on ``names`` and check ``expectation``; raise ``CompressionMismatch`` listing every problem
    unless ``allow_mismatch``. Returns the report either way (store it with the cell)."""
    report = layer_report(model, names, originals, expectation)
    problems = check_expectation(report, expectation)
    if problems and not allow_mismatch:
        raise CompressionMismatch(problems, report)
    return report


def _weight(model: nn.Module, name: str) -> torch.Tensor:
    module = _module(model, name)
    return model.get_parameter(name).detach() if module is None else dense_weight(module, name)


def _rel_error(weight: torch.Tensor, original: torch.Tensor) -> float:
    original = original.to(weight.device)
    if original.shape != weight.shape:
        raise ValueError(f"original weight has shape {tuple(original.shape)}, layer has {tuple(weight.shape)}")
    ref = torch.linalg.vector_norm(original.double()).item()
    diff = torch.linalg.vector_norm(weight.double() - original.double()).item()
    if ref == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / ref
