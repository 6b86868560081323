"""Interactive figures of the HTML site as plotly specs (plain ``{"data": [...], "layout": {...}}`` dicts, drawn
in the page by the plotly.js the site ships, see ``saex.report.site``): the transfer gap with hover values, every cell
against any two metrics, and a latent's activation histograms. Titles stay in the page's HTML headings, where
they wrap instead of being cut off; axis titles are the report's column headers (label, unit, arrow). Colours and
markers are the report's one palette (``saex.report.cells``: a colour and a marker per SAE source kind, the scored
model's colours where a figure colours by it), the same as in the PNG figures. Every text has a fixed size of at
least ``FONT`` px minus one (plotly would otherwise shrink bar labels to fit their bar) and log axes are labelled
at the decades only."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

from saex.report.cells import (
    COMPRESSION_COLOURS,
    SCORED_ON_M,
    SOURCE_MARKS,
    Gap,
    Key,
    metric,
    scored_colours,
    scored_on,
    source_colours,
    source_kind,
    tint,
    transfer_gap_rows,
    unique,
)
from saex.report.columns import GAP, Outputs, columns, header, in_order
from saex.run.outputs import SECONDS_TO_OBTAIN
from saex.storage.results import CellResult

Spec = dict[str, object]
SECONDS = SECONDS_TO_OBTAIN.output.name
SECONDS_HEADER = header(SECONDS, {SECONDS: SECONDS_TO_OBTAIN.output})  # the cost column's header, as in the report
MARGIN = {"l": 60, "r": 20, "t": 30, "b": 40}
MENU_Y = 1.25  # the explorer's axis menus, above its legend
FONT = 12  # px: the figures' text (tick labels one less)
GAP_PAIRS_PER_ROW = 6  # transfer gap: bar pairs (compression x source) side by side in one row of subplots
GAP_ROW_HEIGHT = 300  # px per row of subplots
GAP_ROW_GAP = 70  # px between rows: the x tick labels of the row above


def _layout(**extra: object) -> dict[str, object]:
    """Legend above the plot (never clipped at the bottom), room kept for it; fixed font sizes."""
    legend = {"orientation": "h", "x": 0, "y": 1.02, "xanchor": "left", "yanchor": "bottom", "font": {"size": FONT}}
    return {
        "margin": {**MARGIN, "t": 60},
        "hovermode": "closest",
        "legend": legend,
        "font": {"size": FONT},
        **extra,
    }


def _axis(title: str, **extra: object) -> dict[str, object]:
    """An axis titled ``title``, its labels at a fixed size, its margin grown to fit them (never clipped)."""
    font = {"size": FONT}
    return {"title": {"text": title, "font": font}, "tickfont": {"size": FONT - 1}, "automargin": True, **extra}


def log_axis(title: str, top: float) -> dict[str, object]:
    """A log axis from below 1 to above ``top``, labelled at the decades only (1, 10, 100, 1,000), no minor digits."""
    return _axis(
        title, type="log", range=[-0.1, math.log10(max(top, 1)) + 0.2], dtick=1, tickformat=",d", exponentformat="none"
    )


def symbol(source: str) -> str:
    """The plotly marker symbol of an SAE source (``cross`` for a kind without one)."""
    return SOURCE_MARKS.get(source_kind(source), ("", "cross"))[1]


def _text(value: float | None) -> str:
    return "–" if value is None else f"{value:.4g}"


def _range(values: list[float | None]) -> list[float]:
    """A value axis holding 0, every value, and room above (and below, for negative bars) for the Δ labels."""
    found = [v for v in values if v is not None]
    top, bottom = max(found + [0.0]), min(found + [0.0])
    pad = 0.16 * ((top - bottom) or 1.0)
    return [bottom - (pad if bottom < 0 else 0.0), top + pad]


def transfer_gap(results: list[CellResult], outputs: Outputs, key: Key) -> Spec | None:
    """Per ``gap`` metric (one subplot each, in rows of as many as leave each bar pair room for its Δ label): per
    compression, each SAE scored on both models on M (its source's colour, light) and on M_c (full); hovering a bar
    gives both values and Δ. None when no SAE of ``key`` is scored on both."""
    rows = [r for r in transfer_gap_rows(results, in_order(outputs, GAP)) if (r.model, r.hook, r.sae) == key]
    names = [m for m in in_order(outputs, GAP) if any(r.values[m][1] is not None for r in rows)]
    if not names:
        return None
    sources = unique(r.source for r in rows)
    colours = source_colours(sources)
    pairs = len(unique(r.compression for r in rows)) * len(sources)
    per_row = max(1, min(len(names), GAP_PAIRS_PER_ROW // pairs))
    n_rows = math.ceil(len(names) / per_row)
    plot_height = n_rows * GAP_ROW_HEIGHT + (n_rows - 1) * GAP_ROW_GAP
    step, gap = (GAP_ROW_HEIGHT + GAP_ROW_GAP) / plot_height, GAP_ROW_GAP / plot_height
    data: list[dict[str, object]] = []
    layout = _layout(barmode="group", height=plot_height + 60 + 50, margin={**MARGIN, "t": 60, "b": 50})
    width = 1 / per_row
    for i, name in enumerate(names):
        axis = "" if i == 0 else str(i + 1)
        row, column = divmod(i, per_row)
        top = 1 - row * step
        layout[f"xaxis{axis}"] = _axis(
            "", domain=[column * width + 0.04, (column + 1) * width - 0.04], anchor=f"y{axis}", tickangle=0
        )
        layout[f"yaxis{axis}"] = _axis(
            header(name, outputs),
            domain=[max(0.0, top - step + gap), top],
            anchor=f"x{axis}",
            range=_range([v for r in rows for v in r.values[name][:2]]),
        )
        for source in sources:
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
                        "marker": {"color": colours[source] if index else tint(colours[source])},
                        "text": [None if index == 0 or g[2] is None else f"Δ {g[2]:+.3g}" for g in gaps],
                        "textposition": "outside",
                        "textangle": 0,
                        "textfont": {"size": FONT},
                        "constraintext": "none",  # a fixed size: plotly would shrink the label to the bar's width
                        "cliponaxis": False,
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
    colours = scored_colours(results)
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
                "color": colours[group],
                "symbol": [symbol(cells[i].cell["source"]) for i in index],
                "line": {"width": 0.5, "color": "black"},
            },
            "hovertemplate": f"%{{text}} on {group}<br>x %{{x:.4g}}<br>y %{{y:.4g}}<extra></extra>",
        }
        for group, index in zip(groups, members)
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
        where = {"x": x, "y": MENU_Y, "yanchor": "bottom", "font": {"size": FONT}}
        return {"buttons": buttons, "active": present.index(chosen), **where}

    def caption(text: str, x: float) -> dict[str, object]:
        where = {"x": x, "y": MENU_Y + 0.02, "xanchor": "right", "yanchor": "bottom"}
        return {"text": text, "xref": "paper", "yref": "paper", "showarrow": False, "font": {"size": FONT}, **where}

    layout = _layout(
        height=480,
        margin={**MARGIN, "t": 120},
        xaxis=_axis(labels[x0]),
        yaxis=_axis(labels[y0]),
        updatemenus=[menu("x", x0, 0.03), menu("y", y0, 0.53)],
        annotations=[caption("x:", 0.025), caption("y:", 0.525)],
    )
    return {"data": data, "layout": layout}


def histogram(edges: Sequence[float], counts: dict[str, Sequence[int]]) -> Spec:
    """A latent's activation histogram on each model (``counts``: model label -> counts of the non-zero bins
    between ``edges``), overlaid, log-scaled counts; the zero bin (``saex.analysis.feature_data``'s first) is
    stated in the page, not drawn. Coloured by the scored model: M first, then M_c."""
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
            "marker": {"color": (SCORED_ON_M, *COMPRESSION_COLOURS)[i % (1 + len(COMPRESSION_COLOURS))]},
            "hovertemplate": f"{label}: %{{y}} tokens at %{{x:.3g}}<extra></extra>",
        }
        for i, (label, values) in enumerate(counts.items())
    ]
    top = max((v for values in counts.values() for v in values), default=1)
    layout = _layout(
        barmode="overlay",
        height=260,
        xaxis=_axis("activation"),
        yaxis=log_axis("tokens (log)", top),
    )
    return {"data": data, "layout": layout}
