"""PNG figures of a matrix's results (docs/REPORT.md): one function per figure, each returns the saved path.

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot, no global figure state), so they
render without a display and never leak between calls. A figure whose data are absent raises ``NoData``;
``plan`` turns that into a note for the report instead of a file.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.lines import Line2D

from saex.report.cells import (
    Key,
    compressed,
    is_pruned,
    metric,
    panels,
    references,
    scored_colours,
    scored_on,
    slug,
    source_colours,
    source_kind,
    source_of,
    source_rank,
    tint,
    transfer_gap_rows,
    unique,
)
from saex.report.columns import COST_QUALITY, GAP, VS_SPARSITY, Outputs, header, in_order, short_label
from saex.report.comparison_figures import plan_comparisons
from saex.report.drawing import (
    REFERENCE_STYLES,
    SHAPE_ONLY,
    NoData,
    describe,
    grid,
    legend,
    marker,
    plain_log_ticks,
    save,
)
from saex.run.outputs import SECONDS_TO_OBTAIN
from saex.storage.results import CellResult

# --- (a) a metric against the SAE's pruning sparsity ------------------------------------------------------


@dataclass
class _SparsityPanel:
    compression: str
    curves: dict[str, list[tuple[float, float]]]  # strategy -> (sparsity, value), x = 0 is the original
    lines: dict[str, float] = field(default_factory=dict)  # reference label -> value


def _sparsity_data(results: list[CellResult], name: str, key: Key) -> list[_SparsityPanel]:
    model, hook, sae = key
    reference = metric(references(results).get(key), name)
    out = []
    for compression, cells in compressed(results, model, hook, sae).items():
        by_source = {r.cell["source"]: r for r in cells}
        original = metric(by_source.get("original"), name)
        curves: dict[str, list[tuple[float, float]]] = {}
        for r in cells:
            src = source_of(r.cell["source"])
            if src and src.kind == "pruned" and src.sparsity is not None and (value := metric(r, name)) is not None:
                curves.setdefault(src.pruner or "?", []).append((src.sparsity, value))
        if not curves:
            continue
        for points in curves.values():
            if original is not None:
                points.append((0.0, original))
            points.sort()
        lines = {
            "original on M": reference,
            "original on M_c": original,
            "retrained on M_c": metric(by_source.get("retrained"), name),
        }
        out.append(_SparsityPanel(compression, curves, {k: v for k, v in lines.items() if v is not None}))
    if not out:
        raise NoData(f"no pruned:<strategy>@<s> SAE with {name} for {describe(key, False)}")
    return out


def sparsity_figure(results: list[CellResult], outputs: Outputs, name: str, key: Key, path: Path) -> Path:
    """``name`` against the SAE's pruning sparsity: one line per strategy (the pruned sources' colour, a shade per
    strategy), one panel per compression."""
    data = _sparsity_data(results, name, key)
    strategies = sorted({s for p in data for s in p.curves})
    shades = source_colours(f"pruned:{s}" for s in strategies)
    colors = {s: shades[f"pruned:{s}"] for s in strategies}
    fig, axes = grid(len(data))
    xs = sorted({x for p in data for points in p.curves.values() for x, _ in points})
    for ax, panel in zip(axes, data):
        for label, value in panel.lines.items():
            ax.axhline(value, **REFERENCE_STYLES[label])
        for strategy, points in panel.curves.items():
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker=marker("pruned"), color=colors[strategy], linewidth=2)
        ax.set_title(panel.compression, fontsize=11)
        ax.set_xticks(xs)
        ax.set_xlim(min(xs) - 0.05, max(xs) + 0.05)
        ax.set_xlabel("SAE pruning sparsity (0 = original)")
        ax.set_ylabel(header(name, outputs))
        ax.grid(alpha=0.3)
    handles = [
        Line2D([], [], marker=marker("pruned"), color=colors[s], linewidth=2, label=f"pruned: {s}") for s in strategies
    ]
    handles += [
        Line2D([], [], label=label, **style)
        for label, style in REFERENCE_STYLES.items()
        if any(label in p.lines for p in data)
    ]
    legend(fig, handles)
    title = f"{short_label(name, outputs)} vs SAE pruning sparsity, per compression: {describe(key, False)}"
    fig.suptitle(title, fontsize=13)
    return save(fig, path)


# --- (b) transfer gap: the same SAE on M vs on M_c ------------------------------------------------------

GapBars = dict[str, dict[str, list[tuple[str, float | None, float]]]]


def _gap_data(results: list[CellResult], outputs: Outputs, key: Key) -> GapBars:
    """metric -> source -> [(compression, value on M, value on M_c)] for the SAEs scored on both."""
    data: GapBars = {}
    for row in transfer_gap_rows(results, in_order(outputs, GAP)):
        if (row.model, row.hook, row.sae) != key:
            continue
        for name, (on_m, on_mc, _) in row.values.items():
            if on_mc is not None:
                data.setdefault(name, {}).setdefault(row.source, []).append((row.compression, on_m, on_mc))
    if not data:
        raise NoData(f"no SAE scored on both M and a compressed model for {describe(key, False)}")
    return data


def transfer_gap_figure(results: list[CellResult], outputs: Outputs, key: Key, path: Path) -> Path:
    """Bars per compression: each SAE scored on both (``original``, ``loaded:*``) in its source's colour, light on M
    and full on M_c, Δ written above each pair."""
    data = _gap_data(results, outputs, key)
    sources = sorted({s for per in data.values() for s in per}, key=source_rank)
    colors = {s: (tint(c), c) for s, c in source_colours(sources).items()}
    compressions = list(dict.fromkeys(c for per in data.values() for rows in per.values() for c, _, _ in rows))
    fig, axes = grid(len(data), width=max(4.4, 1.0 + 0.9 * len(sources) * len(compressions)))
    width = 0.8 / (2 * len(sources))
    for ax, (name, per_source) in zip(axes, data.items()):
        values = [v for rows in per_source.values() for _, m, c in rows for v in (m, c) if v is not None]
        top, bottom = max(values + [0.0]), min(values + [0.0])
        pad = 0.04 * ((top - bottom) or 1.0)
        for i, source in enumerate(sources):
            for compression, on_m, on_mc in per_source.get(source, []):
                x = compressions.index(compression) - 0.4 + (2 * i + 1) * width
                ax.bar(x - width / 2, math.nan if on_m is None else on_m, width, color=colors[source][0])
                ax.bar(x + width / 2, on_mc, width, color=colors[source][1])
                if on_m is not None:
                    ax.text(
                        x, max(on_m, on_mc, 0.0) + pad, f"Δ {on_mc - on_m:+.3f}", ha="center", va="bottom", fontsize=8
                    )
        ax.set_ylim(bottom - (pad if bottom < 0 else 0), top + 5 * pad)
        ax.set_xticks(range(len(compressions)), compressions, rotation=30, ha="right")
        ax.set_xlabel("compression")
        ax.set_ylabel(header(name, outputs))
        ax.set_title(short_label(name, outputs), fontsize=11)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.grid(axis="y", alpha=0.3)
    handles = [
        Line2D([], [], color=colors[s][j], linewidth=8, label=f"{s} SAE on {target}")
        for s in sources
        for j, target in enumerate(("M", "M_c"))
    ]
    legend(fig, handles)
    fig.suptitle(f"Transfer gap per compression: {describe(key, False)}", fontsize=13)
    return save(fig, path)


# --- (c) cost vs quality ------------------------------------------------------------------------------------


def _cost_data(results: list[CellResult], name: str, key: Key) -> list[tuple[str, list[tuple[str, float, float]]]]:
    """[(compression, [(source, seconds, value)])] for the SAEs scored on M_c."""
    model, hook, sae = key
    out = []
    for compression, cells in compressed(results, model, hook, sae).items():
        points = []
        for r in cells:
            seconds, value = SECONDS_TO_OBTAIN.value(r.cost), metric(r, name)
            if seconds is not None and seconds > 0 and value is not None:
                points.append((r.cell["source"], float(seconds), value))
        if points:
            out.append((compression, points))
    if not out:
        raise NoData(f"no SAE on M_c with both a cost in seconds and {name} for {describe(key, False)}")
    return out


def cost_quality_figure(results: list[CellResult], outputs: Outputs, name: str, key: Key, path: Path) -> Path:
    """Seconds to obtain each SAE (log x) against ``name`` on M_c, one marker per source, a panel per compression."""
    data = _cost_data(results, name, key)
    reference = metric(references(results).get(key), name)
    sources = sorted({s for _, points in data for s, _, _ in points}, key=source_rank)
    colors = source_colours(sources)
    markers = {s: marker(s) for s in sources}
    fig, axes = grid(len(data))
    for ax, (compression, points) in zip(axes, data):
        if reference is not None:
            ax.axhline(reference, **REFERENCE_STYLES["original on M"])
        for source, seconds, value in points:
            ax.scatter(
                seconds,
                value,
                s=70,
                color=colors[source],
                marker=markers[source],
                edgecolor="black",
                linewidth=0.5,
                zorder=3,
            )
        ax.set_xscale("log")
        plain_log_ticks(ax.xaxis)
        ax.margins(x=0.25, y=0.15)
        ax.set_title(compression, fontsize=11)
        ax.set_xlabel("seconds to obtain the SAE (log)")
        ax.set_ylabel(header(name, outputs))
        ax.grid(alpha=0.3, which="both")
    handles = [
        Line2D([], [], linestyle="", marker=markers[s], markersize=9, color=colors[s], markeredgecolor="black", label=s)
        for s in sources
    ]
    if reference is not None:
        handles.append(Line2D([], [], label="original on M", **REFERENCE_STYLES["original on M"]))
    legend(fig, handles)
    fig.suptitle(f"Cost vs quality on M_c ({short_label(name, outputs)}): {describe(key, False)}", fontsize=13)
    return save(fig, path)


# --- (d) declared pairs: one metric against another, every cell a point ---------------------------------------

Point = tuple[str, str, float, float]  # (SAE source, scored on (cells.scored_on), x, y)


def _against_data(results: list[CellResult], outputs: Outputs, x: str, key: Key) -> dict[str, list[Point]]:
    """y -> its points against ``x``, for every output declaring ``plotted_against`` ``x``, cells of ``key``."""
    cells = [r for r in results if (r.cell["model"], r.cell["hook"], r.cell["sae"]) == key]
    data: dict[str, list[Point]] = {}
    for y in in_order(outputs, lambda o: x in o.plotted_against):
        for r in cells:
            if (xv := metric(r, x)) is not None and (yv := metric(r, y)) is not None:
                data.setdefault(y, []).append((r.cell["source"], scored_on(r), xv, yv))
    if not data:
        raise NoData(f"no cell has {x} and a metric plotted against it for {describe(key, False)}")
    return data


def against_figure(results: list[CellResult], outputs: Outputs, x: str, key: Key, path: Path) -> Path:
    """The outputs declared ``plotted_against`` ``x``, one panel each: a point per cell, coloured by the scored
    model (M or a compression, ``scored_colours``) and marked by SAE source kind."""
    data = _against_data(results, outputs, x, key)
    models = unique(m for points in data.values() for _, m, _, _ in points)
    colors = scored_colours(results)
    kinds = unique(source_kind(s) for points in data.values() for s, _, _, _ in points)
    fig, axes = grid(len(data))
    for ax, (y, points) in zip(axes, data.items()):
        for source, model, xv, yv in points:
            ax.scatter(
                xv, yv, s=70, color=colors[model], marker=marker(source), edgecolor="black", linewidth=0.5, zorder=3
            )
        ax.margins(0.15)
        ax.set_xlabel(header(x, outputs))
        ax.set_ylabel(header(y, outputs))
        ax.set_title(short_label(y, outputs), fontsize=11)
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], linestyle="", marker="o", markersize=9, color=colors[m], label=f"on {m}") for m in models]
    handles += [
        Line2D([], [], linestyle="", marker=marker(k), markersize=9, **SHAPE_ONLY, label=k or "other") for k in kinds
    ]
    legend(fig, handles)
    fig.suptitle(f"Against {short_label(x, outputs)}, every cell: {describe(key, False)}", fontsize=13)
    return save(fig, path)


# --- what a report draws ------------------------------------------------------------------------------------

Draw = Callable[[Path], Path]


def plan(
    results: list[CellResult], outputs: Outputs, out_dir: Path, prefix: str = ""
) -> tuple[list[tuple[str, Path, Draw]], list[tuple[str, str]]]:
    """The figures these results support: ``(title, path, draw)`` to draw and ``(title, reason)`` skipped.

    Which metrics are plotted comes from their declarations (``vs_sparsity``, ``gap``, ``cost_quality``,
    ``plotted_against``: drawn only when some cell has the plotted metric). A
    figure kind with no data anywhere gives one skip note; a (hook, sae) lacking data while others have it
    gives a note of its own.
    """
    keys = panels(results)
    many_models = len({model for model, _, _ in keys}) > 1
    draws: list[tuple[str, Path, Draw]] = []
    skipped: list[tuple[str, str]] = []

    def name_of(kind: str, key: Key, metric_name: str | None = None) -> Path:
        model, hook, sae = key
        parts = [kind, metric_name, hook, sae, model if many_models else None]
        return Path(out_dir) / (prefix + "-".join(slug(p) for p in parts if p) + ".png")

    def add(
        title_of: Callable[[Key], str],
        check: Callable[[Key], object],
        make: Callable[[Key, Path], Path],
        kind: str,
        metric_name: str | None,
        absent: str,
    ) -> None:
        found, missing = [], []
        for key in keys:
            try:
                check(key)
                found.append(key)
            except NoData as exc:
                missing.append((key, str(exc)))
        if not found:
            skipped.append((title_of(None), absent))
            return
        for key in found:
            path = name_of(kind, key, metric_name)
            draws.append((title_of(key), path, lambda p, key=key: make(key, p)))
        skipped.extend((title_of(key), reason) for key, reason in missing)

    has = {m for r in results for m in r.metrics}
    has_pruned = any(is_pruned(r) for r in results)
    for name in in_order(outputs, VS_SPARSITY):
        shown = short_label(name, outputs)
        absent = (
            f"no cell has {shown}"
            if name not in has
            else "no pruned:<strategy>@<s> SAE sources in these results"
            if not has_pruned
            else f"no pruned SAE has {shown}"
        )
        add(
            lambda key, s=shown: f"{s} vs SAE pruning sparsity" + (f" ({describe(key, many_models)})" if key else ""),
            lambda key, n=name: _sparsity_data(results, n, key),
            lambda key, p, n=name: sparsity_figure(results, outputs, n, key, p),
            "sparsity",
            name,
            absent,
        )
    add(
        lambda key: "Transfer gap per compression" + (f" ({describe(key, many_models)})" if key else ""),
        lambda key: _gap_data(results, outputs, key),
        lambda key, p: transfer_gap_figure(results, outputs, key, p),
        "transfer-gap",
        None,
        "no SAE scored on both M and a compressed model with "
        + " / ".join(short_label(name, outputs) for name in in_order(outputs, GAP)),
    )
    for name in in_order(outputs, COST_QUALITY):
        shown = short_label(name, outputs)
        add(
            lambda key, s=shown: f"Cost vs quality ({s})" + (f", {describe(key, many_models)}" if key else ""),
            lambda key, n=name: _cost_data(results, n, key),
            lambda key, p, n=name: cost_quality_figure(results, outputs, n, key, p),
            "cost",
            name,
            f"no cell has {shown}" if name not in has else "no SAE on M_c with a recorded cost in seconds",
        )
    plotted = {y for y in in_order(outputs, lambda o: bool(o.plotted_against)) if y in has}
    for x in unique(x for y in plotted for x in outputs[y].plotted_against):
        shown = short_label(x, outputs)
        add(
            lambda key, s=shown: f"Against {s}" + (f" ({describe(key, many_models)})" if key else ""),
            lambda key, x=x: _against_data(results, outputs, x, key),
            lambda key, p, x=x: against_figure(results, outputs, x, key, p),
            "against",
            x,
            f"no cell has {shown}",
        )

    more, more_skipped = plan_comparisons(results, outputs, add, name_of)
    return draws + more, skipped + more_skipped
