"""Metric dispatch: per-SAE metrics for one scored SAE, and splice metrics for every SAE scored on one
(model, hook) at once, so the layers before the hook run once for all of them. Results are flat dicts of
floats; two metrics returning the same key is an error, never a silent overwrite."""

from __future__ import annotations

from collections.abc import Mapping

from saex.protocols import Metric, MetricContext, SpliceContext
from saex.registry import Resolved


def of_scope(metrics: list[Resolved[Metric]], scope: str) -> list[Resolved[Metric]]:
    return [m for m in metrics if m.component.scope == scope]


def sae_metrics(metrics: list[Resolved[Metric]], ctx: MetricContext) -> dict[str, float]:
    """Every per-SAE metric (``scope = "sae"``) of ``metrics`` on one SAE."""
    values: dict[str, float] = {}
    for metric in of_scope(metrics, "sae"):
        merge(values, metric.component.compute(ctx, metric.params), metric.name)
    return values


def splice_metrics(metrics: list[Resolved[Metric]], ctx: SpliceContext) -> dict[str, dict[str, float]]:
    """Every splice metric of ``metrics`` for each SAE of ``ctx.saes``, by its label."""
    values: dict[str, dict[str, float]] = {label: {} for label in ctx.saes}
    for metric in of_scope(metrics, "splice"):
        for label, found in metric.component.compute_spliced(ctx, metric.params).items():
            merge(values[label], found, metric.name)
    return values


def merge(values: dict[str, float], found: Mapping[str, float], metric: str) -> None:
    for k, v in found.items():
        if k in values:
            raise ValueError(f"metric {metric!r} returns {k!r}, already returned by another metric")
        values[k] = float(v)
