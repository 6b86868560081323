"""Metric dispatch: per-SAE metrics for one scored SAE, and splice metrics for every SAE scored on one
(model, hook) at once, so the layers before the hook run once for all of them. Results are flat dicts of
floats; two metrics returning the same key is an error, never a silent overwrite."""

from __future__ import annotations

from collections.abc import Mapping

from saex.config.registry import Resolved
from saex.plugin.protocols import Metric, MetricContext
from saex.plugin.returns import ContractError, metric_values
from saex.sae.splice_context import SpliceContext


def of_scope(metrics: list[Resolved[Metric]], scope: str) -> list[Resolved[Metric]]:
    return [m for m in metrics if m.component.scope == scope]


def sae_metrics(metrics: list[Resolved[Metric]], ctx: MetricContext) -> dict[str, float]:
    """Every per-SAE metric (``scope = "sae"``) of ``metrics`` on one SAE."""
    values: dict[str, float] = {}
    for metric in of_scope(metrics, "sae"):
        merge(values, metric.component.compute(ctx, metric.params), _named(metric))
    return values


def splice_metrics(metrics: list[Resolved[Metric]], ctx: SpliceContext) -> dict[str, dict[str, float]]:
    """Every splice metric of ``metrics`` for each SAE of ``ctx.saes``, by its label."""
    values: dict[str, dict[str, float]] = {label: {} for label in ctx.saes}
    for metric in of_scope(metrics, "splice"):
        by_label = metric.component.compute_spliced(ctx, metric.params)
        if not isinstance(by_label, Mapping) or set(by_label) - set(ctx.saes):
            raise ContractError(
                f"metric {_named(metric)}: compute_spliced must return a dict of SAE label -> metric dict with the "
                f"labels of ctx.saes ({sorted(ctx.saes)}), got {type(by_label).__name__} {list(by_label)[:5]!r}"
            )
        for label, found in by_label.items():
            merge(values[label], found, _named(metric))
    return values


def _named(metric: Resolved[Metric]) -> str:
    """``'entry'``, or ``'entry' (plugin 'name')`` where the registry entry and the plugin are named apart."""
    plugin = metric.component.name
    return repr(metric.name) + ("" if plugin == metric.name else f" (plugin {plugin!r})")


def merge(values: dict[str, float], found: object, metric: str) -> None:
    """Add a metric's checked values (``saex.plugin.returns.metric_values``) to ``values``."""
    for k, v in metric_values(metric, found).items():
        if k in values:
            raise ValueError(f"metric {metric} returns {k!r}, already returned by another metric")
        values[k] = v
