"""The compact view of a matrix's results for a terminal (``saex run``'s last words, ``saex report MATRIX``): no line
wider than ``WIDTH`` (100) columns, whatever the matrix.

One table per (model, hook, SAE, compression), the SAEs scored on M first (the references) then those scored on
M_c, as in the markdown report's tables. Per cell: the first characters of its key (what ``saex export --key``
takes), its source, where it was scored (M or M_c, the group's title naming the compression), and the headline
metrics that declare a bootstrap interval or a transfer gap, each as ``value ± half-width``; under every cell that
is not the reference itself, a Δ row: each metric's paired difference against the original SAE on the same model
and eval tokens (its declared ``difference_of`` output, with its interval), else the plain difference from the
original's row. Where the columns do not fit beside each other they go on in further bands of the same rows.
Cells are read through ``saex.report.cells``, columns and their declarations through ``saex.report.columns``:
this module names no metric.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

from saex.plugin.protocols import MetricOutput
from saex.report.cells import (
    base_rows,
    compressed,
    first_line,
    fmt,
    metric,
    on_base,
    signed,
    source_kind,
    source_order,
    unique,
)
from saex.report.columns import ARROWS, HEADLINE, Outputs, columns, paired_difference, short_label, shown
from saex.storage.results import CellResult

WIDTH = 100  # columns of the terminal the summary is written for
KEY_CHARS = 8  # the first characters of a cell's key shown (``saex export --key`` takes any unique prefix)
SOURCE_CHARS = 28  # a longer source is cut (the full one is in the markdown report)
GAP = "  "
DELTA_INDENT = "  "  # a Δ row's label, under its cell's source
LEGEND = (
    "↑ / ↓: higher / lower is better. value ± h: h is half the width of the value's bootstrap interval over eval "
    "blocks. Δ vs original: the paired difference against the original SAE on the same model and eval tokens (° "
    "its interval contains 0; without ± where the metric declares none). Δ vs M: the same SAE on M_c minus on M "
    "(the transfer gap)."
)


def summary_metric(output: MetricOutput) -> bool:
    """The columns of the summary: the headline metrics that declare a bootstrap interval or a transfer gap."""
    return output.headline and (output.interval is not None or output.gap)


def summary_columns(results: list[CellResult], outputs: Outputs) -> list[str]:
    """``summary_metric`` keys present in ``results``, in column order; where there are none, every headline one."""
    return columns(results, outputs, summary_metric) or columns(results, outputs, HEADLINE)


def cut(text: str, width: int) -> str:
    """``text`` in at most ``width`` characters, its end replaced by … when cut."""
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def header(name: str, outputs: Outputs) -> str:
    """A column's header: its label, unit and the arrow of its better direction (no note marks: their notes are
    in the markdown report)."""
    output = outputs.get(name)
    if output is None:
        return name
    unit = f" ({output.unit})" if output.unit else ""
    return f"{short_label(name, outputs)}{unit}{ARROWS[output.higher_is_better]}"


def value_text(result: CellResult, name: str, outputs: Outputs) -> str:
    return fmt(shown(result.metrics, name, outputs)) if result.status == "done" else ""


def difference_text(result: CellResult, reference: CellResult | None, name: str, outputs: Outputs) -> str:
    """The Δ of ``name``: its declared paired difference stored with the cell (with its interval), else the plain
    difference from the reference's value; '' when neither is known."""
    if result.status != "done":
        return ""
    for key, output in outputs.items():
        if output.difference_of == name and paired_difference(output) and metric(result, key) is not None:
            text = shown(result.metrics, key, outputs)
            return text if isinstance(text, str) else signed(metric(result, key))
    on_ref, here = metric(reference, name), metric(result, name)
    return "" if on_ref is None or here is None else signed(here - on_ref)


def is_reference(result: CellResult) -> bool:
    """The SAE the others of its group are compared with: ``original`` (unseeded), or a ``loaded:`` SAE."""
    return result.cell["source"] == "original" or source_kind(result.cell["source"]) == "loaded"


@dataclass
class Line:
    """One row of a group's table: a cell's values, or the Δ row under it (``label`` spans source and scored-on)."""

    key: str
    source: str
    scored: str
    values: list[str]
    status: str = ""  # a cell that is not done: what it is instead of values
    label: str | None = None  # a Δ row


def _group_lines(rows: list[CellResult], metrics: list[str], outputs: Outputs) -> list[Line]:
    lines = []
    for r in rows:
        source = "loaded" if source_kind(r.cell["source"]) == "loaded" else r.cell["source"]  # its name is the title's
        status = "" if r.status == "done" else (f"failed: {first_line(r.error)}" if r.status == "failed" else r.status)
        lines.append(
            Line(
                r.key[:KEY_CHARS],
                cut(source, SOURCE_CHARS),
                "M" if on_base(r) else "M_c",
                [value_text(r, m, outputs) for m in metrics],
                status,
            )
        )
        if r.status != "done":
            continue
        if is_reference(r):  # on M_c: the transfer gap, against the same SAE on M
            on_m = next((x for x in rows if on_base(x) and x.cell["source"] == r.cell["source"]), None)
            deltas = [signed(gap(r, on_m, m)) for m in metrics] if not on_base(r) else []
            label = "Δ vs M"
        else:
            reference = next((x for x in rows if is_reference(x) and on_base(x) == on_base(r)), None)
            deltas = [difference_text(r, reference, m, outputs) for m in metrics]
            label = "Δ vs loaded" if r.config.get("resolved", {}).get("loaded") else "Δ vs original"
        if any(deltas):
            lines.append(Line("", "", "", deltas, label=label))
    return lines


def gap(result: CellResult, on_m: CellResult | None, name: str) -> float | None:
    """``name`` on M_c minus on M, or None where either is unknown."""
    here, there = metric(result, name), metric(on_m, name)
    return None if here is None or there is None else here - there


def _bands(widths: list[int], left: int, width: int) -> list[list[int]]:
    """Metric columns (indices) per band: as many as fit beside the ``left`` columns, each band at least one."""
    bands: list[list[int]] = [[]]
    used = left
    for i, w in enumerate(widths):
        if bands[-1] and used + len(GAP) + w > width:
            bands.append([])
            used = left
        bands[-1].append(i)
        used += len(GAP) + w
    return bands


def group_table(rows: list[CellResult], metrics: list[str], outputs: Outputs, width: int = WIDTH) -> list[str]:
    """A group's rows as fixed-width text lines, none wider than ``width``."""
    lines = _group_lines(rows, metrics, outputs)
    heads = Line("key", "source", "scored on", [header(m, outputs) for m in metrics])
    w_key = max(len(x.key) for x in [heads, *lines])
    w_scored = max(len(x.scored) for x in [heads, *lines])
    w_source = max(len(x.source) for x in [heads, *lines])
    w_source = max(w_source, max((len(DELTA_INDENT + (x.label or "")) for x in lines), default=0) - len(GAP) - w_scored)
    left = w_key + len(GAP) + w_source + len(GAP) + w_scored
    room = max(width - left - len(GAP), 1)
    widths = [min(max(len(x.values[i]) for x in [heads, *lines]), room) for i in range(len(metrics))]

    def text(x: Line, band: list[int]) -> str:
        if x.label is not None:
            middle = (DELTA_INDENT + x.label).ljust(w_source + len(GAP) + w_scored)
        else:
            middle = x.source.ljust(w_source) + GAP + x.scored.ljust(w_scored)
        line = x.key.ljust(w_key) + GAP + middle
        if x.status:
            line += GAP + x.status
        elif band:
            line += GAP + GAP.join(cut(x.values[i], widths[i]).ljust(widths[i]) for i in band)
        return cut(line.rstrip(), width)

    out: list[str] = []
    for band in _bands(widths, left, width) if metrics else [[]]:
        out += [""] if out else []
        out += [text(x, band) for x in [heads, *lines]]
    return out


def groups(results: list[CellResult]) -> list[tuple[str, list[CellResult]]]:
    """(title, rows) per (model, hook, SAE, compression), in matrix order: the SAEs scored on M, then on M_c."""
    found = []
    models = unique(r.cell["model"] for r in results)
    for model, hook in unique((r.cell["model"], r.cell["hook"]) for r in results):
        refs = base_rows(results, model, hook)
        by_compression = compressed(results, model, hook) or {None: []}
        for sae in unique(r.cell["sae"] for r in results if (r.cell["model"], r.cell["hook"]) == (model, hook)):
            mine = sorted((r for r in refs if r.cell["sae"] == sae), key=source_order)
            for compression, cells in by_compression.items():
                theirs = sorted((r for r in cells if r.cell["sae"] == sae), key=source_order)
                if not mine and not theirs:
                    continue
                where = f"M_c = {compression}" if compression else "no compression"
                title = f"{hook} · SAE {sae} · {where}" + (f" · {model}" if len(models) > 1 else "")
                found.append((title, mine + theirs))
    return found


STATUS_ORDER = ("done", "failed", "running")


def counts(results: list[CellResult]) -> str:
    """``3 cells: 2 done, 1 failed``."""
    statuses = sorted(
        unique(r.status for r in results),
        key=lambda s: (s not in STATUS_ORDER, STATUS_ORDER.index(s) if s in STATUS_ORDER else 0, s),
    )
    return f"{len(results)} cells, " + ", ".join(f"{sum(r.status == s for r in results)} {s}" for s in statuses)


def summary(title: str, results: list[CellResult], outputs: Outputs, *, note: str = "", width: int = WIDTH) -> str:
    """The compact view of ``results`` (module doc) under ``title``, none of its lines wider than ``width``."""
    lines = [cut(f"{title}: {counts(results)}" if results else f"{title}: no results yet", width)]
    lines += textwrap.wrap(note, width) if note else []
    metrics = summary_columns(results, outputs)
    for group_title, rows in groups(results):
        lines += ["", cut(group_title, width), *group_table(rows, metrics, outputs, width)]
    if results:
        lines += ["", *textwrap.wrap(LEGEND, width)]
    return "\n".join(lines)


def next_steps(matrix: str, store: str, options: Sequence[str] = ()) -> str:
    """Where the results are, the commands that print the full report and write the HTML site, and the one that
    takes an SAE out (``options``: the ``--registry`` / ``--store`` arguments that find the same results)."""
    extra = "".join(f" {option}" for option in options)
    return "\n".join(
        [
            f"results:     {store}",
            f"full report: saex report {matrix}{extra} --full",
            f"HTML site:   saex report {matrix}{extra} --out reports/{matrix}",
            f"an SAE:      saex export --key KEY{extra} --out DIR",
        ]
    )
