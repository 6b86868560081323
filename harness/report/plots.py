"""Interactive figures of the HTML site as plotly specs (plain ``{"data": [...], "layout": {...}}`` dicts, drawn
in the page by the plotly.js the site ships, see ``saex.report.site``): the transfer gap with hover values, every cell
against any two metrics, and a latent's activation histograms. Titles stay in the page's HTML headings, where
they wrap instead of being cut off; axis titles are the report's column headers (label, unit, arrow)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

from saex.report.cells import SOURCE_MARKS, Gap, Key, metric, scored_on, source_kind, transfer_gap_rows, unique
from saex.report.columns import GAP, Outputs, columns, header, in_order
from saex.run.outputs import SECONDS_TO_OBTAIN
from saex.storage.results import CellResult

Spec = dict[str, object]
SECONDS = SECONDS_TO_OBTAIN.output.name
SECONDS_HEADER = header(SECONDS, {SECONDS: SECONDS_TO_OBTAIN.output})  # the cost column's header, as in the report
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22")
MARGIN = {"l": 60, "r": 20, "t": 30, "b": 40}
MENU_Y = 1.25  # the explorer's axis menus, above its legend


def _layout(**extra: object) -> dict[str, object]:
    """Legend above the plot (never clipped at the bottom), room kept for it."""
    legend = {"orientation": "h", "x": 0, "y": 1.02, "xanchor": "left", "yanchor": "bottom"}
    return {"margin": {**MARGIN, "t": 60}, "hovermode": "closest", "legend": legend, **extra}


def symbol(source: str) -> str:
    """The plotly marker symbol of an SAE source (``cross`` for a kind without one)."""
    return SOURCE_MARKS.get(source_kind(source), ("", "cross"))[1]


def _text(value: float | None) -> str:
    return "–" if value is None else f"{value:.4g}"


def transfer_gap(results: list[CellResult], outputs: Outputs, key: Key) -> Spec | None:
    """Per ``gap`` metric (one subplot each, side by side): per compression, each SAE scored on both models on
    M and on M_c; hovering a bar gives both values and Δ. None when no SAE of ``key`` is scored on both."""
    rows = [r for r in transfer_gap_rows(results, in_order(outputs, GAP)) if (r.model, r.hook, r.sae) == key]
    names = [m for m in in_order(outputs, GAP) if any(r.values[m][1] is not None for r in rows)]
    if not names:
        return None
    data: list[dict[str, object]] = []
    layout = _layout(barmode="group", height=380)
    width = 1 / len(names)
    for i, name in enumerate(names):
        axis = "" if i == 0 else str(i + 1)
        layout[f"xaxis{axis}"] = {"domain": [i * width + 0.04, (i + 1) * width - 0.04], "anchor": f"y{axis}"}
        layout[f"yaxis{axis}"] = {"title": {"text": header(name, outputs)}, "anchor": f"x{axis}", "automargin": True}
        for j, source in enumerate(unique(r.source for r in rows)):
            mine = [r for r in rows if r.source == source]
            gaps: list[Gap] = [r.values[name] for r in mine]
            for target, index in (("M", 0), ("M_c", 1)):
                data.append(
                    {
                        "type": "bar",
                        "name": f"{source} on {target}",
                        "legendgroup": f"{source} on {target}",
                        "showlegend": i == 0,
                        "x": [r.compression for r in mine],
                        "y": [g[index] for g in gaps],
                        "marker": {"color": PALETTE[j % len(PALETTE)], "opacity": 0.45 if index == 0 else 1.0},
                        "text": [None if index == 0 or g[2] is None else f"Δ {g[2]:+.3g}" for g in gaps],
                        "textposition": "outside",
                        "customdata": [
                            [_text(g[0]), _text(g[1]), "–" if g[2] is None else f"{g[2]:+.4g}"] for g in gaps
                        ],
                        "hovertemplate": f"{source} on {target}<br>%{{x}}<br>on M %{{customdata[0]}}, "
                        "on M_c %{customdata[1]}, Δ %{customdata[2]}<extra></extra>",
                        "xaxis": f"x{axis}",
                        "yaxis": f"y{axis}",
                    }
                )
    return {"data": data, "layout": layout}


def explorer(results: list[CellResult], outputs: Outputs, key: Key) -> Spec | None:
    """Every finished cell of ``key`` as a point, one trace per scored model (M, each M_c), marked by SAE source;
    two menus choose the x and y axes among the metrics the cells have and the seconds to obtain the SAE.
    None when fewer than two quantities are present."""
    cells = [r for r in results if (r.cell["model"], r.cell["hook"], r.cell["sae"]) == key and r.status == "done"]
    names = [m for m in columns(cells, outputs) if any(metric(r, m) is not None for r in cells)]
    values = {m: [metric(r, m) for r in cells] for m in names}
    values[SECONDS] = [SECONDS_TO_OBTAIN.value(r.cost) for r in cells]
    labels = {m: header(m, outputs) for m in names} | {SECONDS: SECONDS_HEADER}
    present = [m for m in values if any(v is not None for v in values[m])]
    if len(present) < 2:
        return None
    x0, y0 = present[-1], present[0]  # seconds to obtain against the first declared metric: cost vs quality
    groups = unique(scored_on(r) for r in cells)
    members = [[i for i, r in enumerate(cells) if scored_on(r) == g] for g in groups]
    data = [
        {
            "type": "scatter",
            "mode": "markers",
            "name": f"on {group}",
            "x": [values[x0][i] for i in index],
            "y": [values[y0][i] for i in index],
            "text": [cells[i].cell["source"] for i in index],
            "marker": {
                "size": 11,
                "color": PALETTE[g % len(PALETTE)],
                "symbol": [symbol(cells[i].cell["source"]) for i in index],
                "line": {"width": 0.5, "color": "black"},
            },
            "hovertemplate": f"%{{text}} on {group}<br>x %{{x:.4g}}<br>y %{{y:.4g}}<extra></extra>",
        }
        for g, (group, index) in enumerate(zip(groups, members))
    ]

    def menu(axis: str, chosen: str, x: float) -> dict[str, object]:
        buttons = [
            {
                "label": labels[m],
                "method": "update",
                "args": [
                    {axis: [[values[m][i] for i in index] for index in members]},
                    {f"{axis}axis.title.text": labels[m]},
                ],
            }
            for m in present
        ]
        return {"buttons": buttons, "active": present.index(chosen), "x": x, "y": MENU_Y, "yanchor": "bottom"}

    def caption(text: str, x: float) -> dict[str, object]:
        where = {"x": x, "y": MENU_Y + 0.02, "xanchor": "right", "yanchor": "bottom"}
        return {"text": text, "xref": "paper", "yref": "paper", "showarrow": False, **where}

    layout = _layout(
        height=480,
        margin={**MARGIN, "t": 120},
        xaxis={"title": {"text": labels[x0]}, "automargin": True},
        yaxis={"title": {"text": labels[y0]}, "automargin": True},
        updatemenus=[menu("x", x0, 0.03), menu("y", y0, 0.53)],
        annotations=[caption("x:", 0.025), caption("y:", 0.525)],
    )
    return {"data": data, "layout": layout}


def histogram(edges: Sequence[float], counts: dict[str, Sequence[int]]) -> Spec:
    """A latent's activation histogram on each model (``counts``: model label -> counts of the non-zero bins
    between ``edges``), overlaid, log-scaled counts; the zero bin is stated in the page, not drawn."""
    centres = [(a + b) / 2 for a, b in itertools.pairwise(edges)]
    width = (edges[-1] - edges[0]) / max(1, len(edges) - 1)
    data = [
        {
            "type": "bar",
            "name": label,
            "x": centres,
            "y": list(values),
            "width": width,
            "opacity": 0.6,
            "marker": {"color": PALETTE[i % len(PALETTE)]},
            "hovertemplate": f"{label}: %{{y}} tokens at %{{x:.3g}}<extra></extra>",
        }
        for i, (label, values) in enumerate(counts.items())
    ]
    top = max((v for values in counts.values() for v in values), default=1)
    layout = _layout(
        barmode="overlay",
        height=260,
        xaxis={"title": {"text": "activation"}},
        yaxis={"title": {"text": "tokens (log)"}, "type": "log", "range": [-0.1, math.log10(max(top, 1)) + 0.2]},
    )
    return {"data": data, "layout": layout}
