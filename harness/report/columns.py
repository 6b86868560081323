"""Metric columns from the metrics' declarations (``MetricOutput``): which keys a table shows and in what order,
their headers (label, note mark, unit, arrow for direction) and footnotes, so neither the markdown report nor
its figures name a metric. A key no loaded metric declares is shown as stored, marked, never dropped: results
outlive the plugins that wrote them."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from operator import attrgetter

from saex.plugin.protocols import MetricOutput
from saex.storage.results import CellResult

Outputs = Mapping[str, MetricOutput]  # metric key -> its declaration (saex.run.outputs.declared_outputs)
Choice = Callable[[MetricOutput], bool]  # which declared outputs a table or figure shows
HEADLINE: Choice = attrgetter("headline")
GAP: Choice = attrgetter("gap")
COST_QUALITY: Choice = attrgetter("cost_quality")
VS_SPARSITY: Choice = attrgetter("vs_sparsity")
NOISE_FLOOR: Choice = attrgetter("noise_floor")


def sparsity_axis(output: MetricOutput) -> bool:
    """The outputs SAEs must match on to be compared (L0), declared with a ``match_factor``."""
    return output.match_factor is not None


ARROWS = {True: " ↑", False: " ↓", None: ""}
NOTE_MARKS = "†‡§¶"
UNDECLARED_MARK = "?"
CONTAINS_ZERO_MARK = "°"
CONTAINS_ZERO_NOTE = (
    f"{CONTAINS_ZERO_MARK} the confidence interval of this paired difference contains 0: the two SAEs are not told "
    "apart on these eval blocks. value ± h: h is half the interval's width (docs/METRICS.md, Uncertainty)."
)
UNDECLARED_NOTE = (
    f"{UNDECLARED_MARK} not declared by any loaded metric (its plugin is not loaded, or it does not declare this "
    "key): shown as stored, with no direction, unit or description."
)


def every(output: MetricOutput) -> bool:
    return True


def paired_difference(output: MetricOutput) -> bool:
    """The paired differences between an SAE and its original on the same tokens (``difference_of``)."""
    return output.difference_of is not None


def in_order(outputs: Outputs, chosen: Choice = every) -> list[str]:
    """The declared keys ``chosen`` selects, in column order: by ``order``, then as declared."""
    ranked = sorted(enumerate(outputs.values()), key=lambda pair: (pair[1].order, pair[0]))
    return [output.name for _, output in ranked if chosen(output)]


def columns(results: Iterable[CellResult], outputs: Outputs, chosen: Choice | None = None) -> list[str]:
    """The metric keys of ``results`` a table shows: the declared ones ``chosen`` selects, in column order; with
    no ``chosen``, every key, the undeclared after the declared, by name. A key holding the end of another key's
    interval is never a column: that key shows ``value ± half-width`` (``shown``)."""
    present = {key for r in results for key in r.metrics}
    ends = {end for output in outputs.values() for end in output.interval or ()}
    shown = [name for name in in_order(outputs, chosen or every) if name in present and name not in ends]
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
            found = [UNDECLARED_NOTE]
        else:
            found = [f"{marks[output.note]} {output.note}"] if output.note else []
            found += [CONTAINS_ZERO_NOTE] if output.difference_of else []
        for line in found:
            if line not in printed:
                printed.add(line)
                lines.append(line)
    return lines


def shown(metrics: Mapping[str, float], name: str, outputs: Outputs) -> float | str | None:
    """A cell's value of ``name`` as a table shows it: ``value ± half-width`` where it declares an interval and
    both ends are finite (a paired difference signed, and marked where its interval contains 0), else as stored."""
    value, output = metrics.get(name), outputs.get(name)
    if output is None or output.interval is None or not _finite(value):
        return value
    low, high = (metrics.get(end) for end in output.interval)
    if not (_finite(low) and _finite(high)):
        return value
    sign = "+" if output.difference_of else ""
    text = f"{value:{sign}.4g} ± {(high - low) / 2:.2g}"
    return text + CONTAINS_ZERO_MARK if output.difference_of and low <= 0 <= high else text


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


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
