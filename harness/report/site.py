"""The report as an offline static site: ``index.html`` beside ``report.md`` and its PNGs (docs/REPORT.md).

Nothing is fetched from a network and nothing needs a server: the page opens from ``file://``; plotly.js (from
the installed plotly wheel) and the site's own CSS/JS are copied into ``assets/``. The page shows, per matrix, a
headline summary per hook and compression (each SAE on M_c, the transfer gap of the SAEs scored on both models,
the best source per metric, the seconds to obtain each SAE), every failed cell with its whole error, interactive
figures (``saex.report.plots``), and the markdown report itself rendered to HTML, so the site's tables are the report's
tables (same columns, headers, units, arrows and footnotes), made sortable and filterable in the page.
Templates are jinja2 files in ``harness/report/templates`` (package data).
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import jinja2
from markdown_it import MarkdownIt
from markdown_it.token import Token
from markupsafe import Markup

from saex.plugin.protocols import MetricOutput
from saex.report.cells import compressed, metric, panels, references, slug, source_order
from saex.report.columns import GAP, Outputs, header, in_order, short_label, value_range
from saex.report.plots import SECONDS_HEADER, Spec, explorer, transfer_gap
from saex.run.outputs import COST_COLUMNS, SECONDS_TO_OBTAIN
from saex.storage.results import CellResult

TEMPLATES = Path(__file__).resolve().parent / "templates"
STATIC = ("site.css", "site.js", "features.js")  # copied from TEMPLATES into assets/
PLOTLY = "plotly.min.js"
INDEX = "index.html"
ASSETS = "assets"


def environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def script_json(value: object) -> Markup:
    """``value`` as JSON safe inside a ``<script>`` element (no ``</script>`` can end it early)."""
    return Markup(json.dumps(value, allow_nan=False).replace("<", "\\u003c").replace(">", "\\u003e"))


def asset_paths(out_dir: Path) -> list[Path]:
    return [Path(out_dir) / ASSETS / name for name in (*STATIC, PLOTLY)]


def write_assets(out_dir: Path) -> list[Path]:
    """plotly.js and the site's CSS/JS under ``out_dir/assets`` (shared by the report and the feature browser)."""
    from plotly.offline import get_plotlyjs

    folder = Path(out_dir) / ASSETS
    folder.mkdir(parents=True, exist_ok=True)
    for name in STATIC:
        (folder / name).write_text((TEMPLATES / name).read_text())
    (folder / PLOTLY).write_text(get_plotlyjs())
    return asset_paths(out_dir)


# --- the report rendered --------------------------------------------------------------------------------------


def tooltip(output: MetricOutput) -> str:
    """What a declared column holds, as its header's tooltip: description (aggregation), unit and range."""
    parts = [f"{output.description} ({output.aggregation})"]
    parts += [f"unit: {output.unit}"] if output.unit else []
    parts += [f"range: {value_range(output)}"] if output.range is not None else []
    return "; ".join(parts)


def tooltips(outputs: Outputs) -> dict[str, str]:
    """Column header -> its tooltip, for every header with a declaration: each declared output (also as the
    transfer gap's ``<header> on M``) and the cost columns."""
    declared = {header(name, outputs): tooltip(o) for name, o in outputs.items()}
    declared |= {f"{text} on M": f"on M: {tip}" for text, tip in declared.items()}
    return declared | {header(c.output.name, {c.output.name: c.output}): tooltip(c.output) for c in COST_COLUMNS}


def markdown_html(text: str, outputs: Outputs) -> Markup:
    """The report's markdown as HTML: tables get the ``data`` class (sortable and filterable by site.js) and
    every header with a declaration a tooltip (``tooltips``); headings get ids for the page's contents."""
    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    tokens = md.parse(text)
    tips = tooltips(outputs)
    for opening, inline in itertools.pairwise(tokens):
        if opening.type == "table_open":
            opening.attrSet("class", "data")
        elif opening.type == "th_open" and inline.content.strip() in tips:
            opening.attrSet("title", tips[inline.content.strip()])
        elif opening.type == "heading_open":
            opening.attrSet("id", "r-" + slug(inline.content))
        elif opening.type == "paragraph_open" and _is_image(inline):
            opening.attrSet("class", "figure")
    return Markup(md.renderer.render(tokens, md.options, {}))


def _is_image(inline: Token) -> bool:
    return bool(inline.children) and all(child.type == "image" for child in inline.children)


# --- summary per hook and compression ---------------------------------------------------------------------------


@dataclass
class Summary:
    """One (model, hook, SAE, compression): every SAE scored on M_c with its ``gap`` metrics (and Δ against M
    where the same SAE is scored on M) and seconds to obtain; the best source per metric."""

    title: str
    header: list[tuple[str, str]]  # (text, tooltip: what the column holds)
    rows: list[list[tuple[str, bool]]]  # (text, is the best of its column)
    best: list[str]


def _best(cells: list[CellResult], name: str, higher: bool | None) -> CellResult | None:
    scored = [r for r in cells if metric(r, name) is not None]
    if higher is None or not scored:
        return None
    pick = max if higher else min
    return pick(scored, key=lambda r: metric(r, name) or 0.0)


def summaries(results: list[CellResult], outputs: Outputs) -> list[Summary]:
    names = [m for m in in_order(outputs, GAP) if any(metric(r, m) is not None for r in results)]
    many_models = len({r.cell["model"] for r in results}) > 1
    out = []
    for model, hook, sae in panels(results):
        for compression, cells in compressed(results, model, hook, sae).items():
            cells = sorted(cells, key=source_order)
            best = {m: _best(cells, m, outputs[m].higher_is_better) for m in names}
            rows = []
            for r in cells:
                row = [(r.cell["source"], False)]
                on_m = references(results, r.cell["source"]).get((model, hook, sae))  # the same SAE on M
                for m in names:
                    value, ref = metric(r, m), metric(on_m, m)
                    text = "" if value is None else f"{value:.4g}"
                    if value is not None and ref is not None:
                        text += f" (Δ {value - ref:+.3g})"
                    row.append((text, best[m] is r))
                seconds = SECONDS_TO_OBTAIN.value(r.cost)
                row.append(("" if seconds is None else f"{seconds:.4g}", False))
                row.append((r.status if r.status != "done" else "", False))
                rows.append(row)
            lines = [
                f"{short_label(m, outputs)}: {chosen.cell['source']} ({metric(chosen, m):.4g})"
                for m, chosen in best.items()
                if chosen is not None
            ]
            title = f"{hook} · {compression} · SAE {sae}" + (f" · {model}" if many_models else "")
            head = [
                ("source on M_c", "the SAE source scored on the compressed model M_c"),
                *((header(m, outputs), tooltip(outputs[m]) + "; (Δ …): minus the same SAE on M") for m in names),
                (SECONDS_HEADER, tooltip(SECONDS_TO_OBTAIN.output)),
                ("status", "blank when done"),
            ]
            out.append(Summary(title, head, rows, lines))
    return out


# --- the page ------------------------------------------------------------------------------------------------


@dataclass
class Plot:
    title: str
    id: str
    spec: Spec


@dataclass
class SitePart:
    """One matrix's part of the page: what ``write_report`` wrote as markdown, and the results behind it."""

    title: str
    results: list[CellResult]
    markdown: str
    note: str = ""


def plots(results: list[CellResult], outputs: Outputs, prefix: str) -> list[Plot]:
    """The interactive figures of one matrix: per (model, hook, SAE) the transfer gap and every cell against
    any two metrics."""
    many_models = len({r.cell["model"] for r in results}) > 1
    found = []
    for key in panels(results):
        model, hook, sae = key
        where = f"{hook}, SAE {sae}" + (f", {model}" if many_models else "")
        for kind, title, spec in (
            ("gap", f"Transfer gap per compression: {where}", transfer_gap(results, outputs, key)),
            ("cells", f"Every cell, any two metrics (menus choose the axes): {where}", explorer(results, outputs, key)),
        ):
            if spec is not None:
                found.append(Plot(title, f"plot-{prefix}{kind}-{slug('-'.join(key))}", spec))
    return found


def failed(results: Iterable[CellResult]) -> list[tuple[CellResult, str]]:
    return [(r, r.details.get("traceback", "")) for r in results if r.status == "failed"]


def write_site(out_dir: Path, parts: list[SitePart], outputs: Outputs, *, features: str | None = None) -> list[Path]:
    """Write ``index.html`` and the assets into ``out_dir`` (the report folder: report.md and the PNGs the
    markdown names are already there); ``features`` is the relative link to a feature browser, if any."""
    out_dir = Path(out_dir)
    written = write_assets(out_dir)
    sections = []
    for i, part in enumerate(parts):
        body = part.markdown.removeprefix(f"## {part.title}\n\n")
        body = body.removeprefix(f"{part.note}\n\n") if part.note else body
        sections.append(
            {
                "id": f"m{i}-{slug(part.title)}",
                "title": part.title,
                "note": part.note,
                "summaries": summaries(part.results, outputs),
                "failed": failed(part.results),
                "plots": plots(part.results, outputs, f"m{i}-"),
                "report": markdown_html(body, outputs),
                "headings": re.findall(r"^### (.+)$", body, flags=re.M),
            }
        )
    html = (
        environment()
        .get_template("report.html.j2")
        .render(sections=sections, features=features, json=script_json, slug=slug)
    )
    (out_dir / INDEX).write_text(html)
    return [out_dir / INDEX, *written]
