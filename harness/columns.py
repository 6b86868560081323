"""Metric columns from the metrics' declarations (``MetricOutput``): which keys a table shows and in what order,
their headers (label, note mark, unit, arrow for direction) and footnotes, so neither the markdown report nor
its figures name a metric. A key no loaded metric declares is shown as stored, marked, never dropped: results
outlive the plugins that wrote them."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from operator import attrgetter

from saex.protocols import MetricOutput
from saex.store import CellResult

Outputs = Mapping[str, MetricOutput]  # metric key -> its declaration (saex.spine_outputs.declared_outputs)
Choice = Callable[[MetricOutput], bool]  # which declared outputs a table or figure shows
HEADLINE: Choice = attrgetter("headline")
GAP: Choice = attrgetter("gap")
COST_QUALITY: Choice = attrgetter("cost_quality")
VS_SPARSITY: Choice = attrgetter("vs_sparsity")

ARROWS = {True: " ↑", False: " ↓", None: ""}
NOTE_MARKS = "†‡§¶"
UNDECLARED_MARK = "?"
UNDECLARED_NOTE = (
    f"{UNDECLARED_MARK} not declared by any loaded metric (its plugin is not loaded, or it does not declare this "
    "key): shown as stored, with no direction, unit or description."
)


def every(output: MetricOutput) -> bool:
    return True


def in_order(outputs: Outputs, chosen: Choice = every) -> list[str]:
    """The declared keys ``chosen`` selects, in column order: by ``order``, then as declared."""
    ranked = sorted(enumerate(outputs.values()), key=lambda pair: (pair[1].order, pair[0]))
    return [output.name for _, output in ranked if chosen(output)]


def columns(results: Iterable[CellResult], outputs: Outputs, chosen: Choice | None = None) -> list[str]:
    """The metric keys of ``results`` a table shows: the declared ones ``chosen`` selects, in column order; with
    no ``chosen``, every key, the undeclared after the declared, by name."""
    present = {key for r in results for key in r.metrics}
    shown = [name for name in in_order(outputs, chosen or every) if name in present]
    return shown if chosen else shown + sorted(present - outputs.keys())


def note_marks(outputs: Outputs) -> dict[str, str]:
    """A mark per distinct note, numbered in column order, so a note has one mark in every table and figure."""
    notes = list(dict.fromkeys(outputs[name].note for name in in_order(outputs, lambda o: o.note is not None)))
    return {note: NOTE_MARKS[i % len(NOTE_MARKS)] * (1 + i // len(NOTE_MARKS)) for i, note in enumerate(notes)}


def short_label(name: str, outputs: Outputs) -> str:
    """The short name of ``name``: its declared label, else the key itself."""
    output = outputs.get(name)
    return (output.label if output else None) or name


def header(name: str, outputs: Outputs) -> str:
    """Column header or axis label: label, note mark, unit and an arrow for the better direction."""
    output = outputs.get(name)
    if output is None:
        return name + UNDECLARED_MARK
    mark = note_marks(outputs)[output.note] if output.note else ""
    unit = f" ({output.unit})" if output.unit else ""
    return f"{output.label or name}{mark}{unit}{ARROWS[output.higher_is_better]}"


def footnotes(names: Iterable[str], outputs: Outputs, printed: set[str]) -> list[str]:
    """The footnotes of the marks of ``names`` not yet in ``printed`` (which then holds them too)."""
    marks = note_marks(outputs)
    lines = []
    for name in names:
        output = outputs.get(name)
        if output is None:
            line = UNDECLARED_NOTE
        elif output.note:
            line = f"{marks[output.note]} {output.note}"
        else:
            continue
        if line not in printed:
            printed.add(line)
            lines.append(line)
    return lines


def value_range(output: MetricOutput) -> str:
    """``[0, 1]``, ``[0, ∞)``: the declared range as an interval, empty when none is declared."""
    if output.range is None:
        return ""
    low, high = output.range
    return ("(-∞" if low is None else f"[{low:g}") + ", " + ("∞)" if high is None else f"{high:g}]")


def legend_rows(names: Iterable[str], outputs: Outputs) -> list[list[str]]:
    """One row per column: header, key, what it is, how it was aggregated, its range."""
    rows = []
    for name in names:
        output = outputs.get(name)
        if output is None:
            rows.append([header(name, outputs), name, "not declared", "", ""])
        else:
            rows.append([header(name, outputs), name, output.description, output.aggregation, value_range(output)])
    return rows
