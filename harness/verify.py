"""Check, layer by layer, that a compression did what it promised.

A compressor states a ``CompressionExpectation`` (harness.protocols); after it ran, the spine measures every
targeted layer (``layer_report``) and compares (``check_expectation``). A layer that silently stayed dense --
the paper's reference code never wrote its pruned MLP weights back -- then stops the cell with
``CompressionMismatch`` instead of producing results for a model that was not compressed as labelled.

``Targets`` is the shared selection of Linear layers; compression plugins embed it as a params field so that
every method selects layers the same way.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from harness.protocols import CompressionExpectation


class Targets(BaseModel):
    """Which ``nn.Linear`` modules a compression touches, by regex on the qualified module name.

    A module is targeted when its name fully matches one ``include`` pattern and no ``exclude`` pattern.
    The default is every Linear inside the decoder layers of an HF Llama-family model, never embeddings or
    the LM head.
    """

    model_config = ConfigDict(extra="forbid")

    include: list[str] = Field(
        default=[r"model\.layers\.\d+\..*"],
        description="regexes (full match) on qualified module names, e.g. 'model.layers.3.mlp.down_proj'",
    )
    exclude: list[str] = Field(
        default=[r".*lm_head", r".*embed.*"],
        description="regexes (full match) of modules never touched, even when an include pattern matches",
    )

    @field_validator("include", "exclude")
    @classmethod
    def _compiles(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"{pattern!r} is not a valid regular expression: {err}") from None
        return patterns

    def matches(self, name: str) -> bool:
        return any(re.fullmatch(p, name) for p in self.include) and not any(
            re.fullmatch(p, name) for p in self.exclude
        )


class NoTargetsError(ValueError):
    """The target patterns selected no ``nn.Linear`` module: a compression would silently do nothing."""


class LayerReport(BaseModel):
    """What one layer's weight looks like after compression."""

    model_config = ConfigDict(extra="forbid")

    name: str
    shape: tuple[int, ...]
    n_params: int
    sparsity: float  # fraction of exact zeros in the weight
    rel_error: float | None = None  # ||W - W0|| / ||W0|| (Frobenius) when the original weight was given


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


def linear_layers(model: nn.Module, targets: Targets | None = None) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules selected by ``targets`` (default ``Targets()``), by qualified name, in
    module order. Raises ``NoTargetsError`` when nothing matches."""
    targets = targets or Targets()
    selected = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and targets.matches(name)
    }
    if not selected:
        linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
        raise NoTargetsError(
            f"no nn.Linear module matches include={targets.include} exclude={targets.exclude}; "
            f"the model's Linear modules include {linear[:5]}" + (" ..." if len(linear) > 5 else "")
        )
    return selected


def clone_weights(
    model: nn.Module, names: Iterable[str], device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """Copies of the named modules' weights (on ``device``, CPU by default), to pass as ``originals``."""
    return {name: _weight(model, name).detach().to(device, copy=True) for name in names}


def layer_report(
    model: nn.Module, names: Iterable[str], originals: Mapping[str, torch.Tensor] | None = None
) -> list[LayerReport]:
    """Measure each named module's weight; ``rel_error`` is filled for names present in ``originals``."""
    reports = []
    for name in names:
        weight = _weight(model, name).detach()
        original = originals.get(name) if originals is not None else None
        reports.append(
            LayerReport(
                name=name,
                shape=tuple(weight.shape),
                n_params=weight.numel(),
                sparsity=(weight == 0).sum().item() / max(weight.numel(), 1),
                rel_error=None if original is None else _rel_error(weight, original),
            )
        )
    return reports


def check_expectation(report: list[LayerReport], expectation: CompressionExpectation) -> list[str]:
    """Human-readable problems, one per failing layer; empty when the compression kept its promise.

    Checked: every name in ``expectation.targets`` is in the report; when a sparsity is promised, every
    target (every reported layer if no targets are named) is within ``tolerance`` of it; when none is
    promised, every target whose original was given must have changed (a sparsity check already implies it).
    """
    by_name = {r.name: r for r in report}
    problems = [f"{name}: not in the layer report (a promised target was not measured)"
                for name in expectation.targets if name not in by_name]
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
    report = layer_report(model, names, originals)
    problems = check_expectation(report, expectation)
    if problems and not allow_mismatch:
        raise CompressionMismatch(problems, report)
    return report


def _weight(model: nn.Module, name: str) -> torch.Tensor:
    module = model.get_submodule(name)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(
            f"{name} is a {type(module).__name__} without a dense `weight` tensor; verification reads dense "
            "weights (a compression that replaces modules must leave or expose one)"
        )
    return weight


def _rel_error(weight: torch.Tensor, original: torch.Tensor) -> float:
    original = original.to(weight.device)
    if original.shape != weight.shape:
        raise ValueError(f"original weight has shape {tuple(original.shape)}, layer has {tuple(weight.shape)}")
    ref = torch.linalg.vector_norm(original.double()).item()
    diff = torch.linalg.vector_norm(weight.double() - original.double()).item()
    if ref == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / ref
