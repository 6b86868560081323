"""Results -> a markdown report (and, with an output folder, PNG figures): docs/REPORT.md says what each shows.

The tables are grouped per (hook, compression) with the SAEs scored on M (``original``, ``loaded:*``) repeated
in every group as references; then the transfer gap (the same SAE on M vs on M_c), cost vs quality, the SAEs
against each other (``saex.report.comparisons``: alignment beside the seed noise floor, matched sparsity), the
compression check, what each metric column holds, and every cell as stored. Which metric goes where, and under
what header, comes from the metrics' declarations (``saex.report.columns``): this module names none.
``write_report`` writes ``report.md`` and the figures of ``saex.report.figures`` into a folder and never
replaces a file there unless asked to (results are never silently overwritten).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from saex.report.cells import (
    GapRow,
    base_rows,
    compressed,
    first_line,
    metric,
    on_base,
    panels,
    signed,
    slug,
    source_order,
    status_note,
    table,
    transfer_gap_rows,
    unique,
)
from saex.report.columns import (
    COST_QUALITY,
    GAP,
    HEADLINE,
    Outputs,
    columns,
    footnotes,
    header,
    in_order,
    legend_rows,
    paired_difference,
    shown,
)
from saex.report.comparisons import comparison_sections
from saex.run.outputs import COST_COLUMNS, SECONDS_TO_OBTAIN, CostColumn
from saex.storage.results import CellResult

COST_NOTE = (
    "Seconds to obtain the SAE: training for `original` (paid once, on M, whatever the compression) and "
    "`retrained`; fine-tuning for `finetuned:*` and calibration + pruning for `pruned:*` (the original's training "
    "not included). Activation "
    "seconds: the model pass that collected the activations it was trained or calibrated on (M's for "
    "`original`; shared by the hooks collected in the same pass)."
)


# --- markdown ---------------------------------------------------------------------------------------------


def _cost_header(column: CostColumn) -> str:
    return header(column.output.name, {column.output.name: column.output})


def cells_table(results: list[CellResult], outputs: Outputs) -> str:
    """Every cell as stored: one row each, every metric key (undeclared ones marked), its status (and a failed
    cell's first error line)."""
    metrics = columns(results, outputs)
    head = ["model", "hook", "sae", "source", "scored on", *(header(m, outputs) for m in metrics)]
    rows = []
    for r in results:
        c = r.cell
        target = "M" if on_base(r) else f"M_c ({c['compression']})"
        status = r.status if not r.error else f"{r.status}: {first_line(r.error, 80)}"
        rows.append(
            [
                c["model"],
                c["hook"],
                c["sae"],
                c["source"],
                target,
                *[shown(r.metrics, m, outputs) for m in metrics],
                SECONDS_TO_OBTAIN.value(r.cost),
                status,
            ]
        )
    return table([*head, _cost_header(SECONDS_TO_OBTAIN), "status"], rows)


def group_tables(results: list[CellResult], outputs: Outputs) -> str:
    """One table per (hook, compression) of the headline metrics: the SAEs scored on M first (references), then
    every SAE on M_c."""
    models = unique(r.cell["model"] for r in results)
    parts = []
    for model, hook in unique((r.cell["model"], r.cell["hook"]) for r in results):
        refs = base_rows(results, model, hook)
        groups = compressed(results, model, hook) or {None: []}
        for compression, cells in groups.items():
            rows_of: list[CellResult] = []
            for sae in unique([r.cell["sae"] for r in refs + cells]):
                rows_of += sorted((r for r in refs if r.cell["sae"] == sae), key=source_order)
                rows_of += sorted((r for r in cells if r.cell["sae"] == sae), key=source_order)
            metrics = columns(rows_of, outputs, HEADLINE)
            head = ["sae", "source", "scored on", *(header(m, outputs) for m in metrics)]
            rows = [
                [
                    r.cell["sae"],
                    r.cell["source"],
                    "M" if on_base(r) else "M_c",
                    *[shown(r.metrics, m, outputs) for m in metrics],
                    SECONDS_TO_OBTAIN.value(r.cost),
                    status_note(r),
                ]
                for r in rows_of
            ]
            where = f"{hook} · {compression or 'no compression'}" + (f" · {model}" if len(models) > 1 else "")
            parts += [f"#### {where}", "", table([*head, _cost_header(SECONDS_TO_OBTAIN), "note"], rows), ""]
    return "\n".join(parts).rstrip()


def gap_columns(rows: list[GapRow], outputs: Outputs) -> list[str]:
    """The declared gap metrics that some row has a value of, in column order."""
    return [m for m in in_order(outputs, GAP) if any(v is not None for row in rows for v in row.values[m][:2])]


def transfer_gap_table(results: list[CellResult], outputs: Outputs) -> str:
    rows = transfer_gap_rows(results, in_order(outputs, GAP))
    metrics = gap_columns(rows, outputs)
    if not rows or not metrics:
        return ""
    multi = len({row.model for row in rows}) > 1
    head = (["model"] if multi else []) + ["hook", "sae", "compression", "source"]
    for m in metrics:
        head += [f"{header(m, outputs)} on M", "on M_c", "Δ"]
    lines = []
    for row in rows:
        cells: list[object] = ([row.model] if multi else []) + [row.hook, row.sae, row.compression, row.source]
        for m in metrics:
            on_m, on_mc, diff = row.values[m]
            cells += [on_m, on_mc, signed(diff)]
        lines.append(cells + [row.note])
    return table(head + ["note"], lines)


def differences_table(results: list[CellResult], outputs: Outputs) -> str:
    """Every cell with paired differences against its original (same model, hook and eval tokens): each declared
    difference as ``value ± half-width``, marked where its interval contains 0."""
    cells = [r for r in results if any(m in r.metrics for m in in_order(outputs, paired_difference))]
    metrics = columns(cells, outputs, paired_difference)
    if not metrics:
        return ""
    head = ["hook", "sae", "scored on", "source", *(header(m, outputs) for m in metrics), "note"]
    rows = [
        [
            r.cell["hook"],
            r.cell["sae"],
            "M" if on_base(r) else f"M_c ({r.cell['compression']})",
            r.cell["source"],
            *[shown(r.metrics, m, outputs) for m in metrics],
            status_note(r),
        ]
        for r in cells
    ]
    return table(head, rows)


def cost_table(results: list[CellResult], outputs: Outputs) -> str:
    """Every SAE scored on M_c: what it cost to obtain and how good it is."""
    keys = panels(results)
    compressions = unique(r.cell["compression"] for r in results if not on_base(r))
    cells = sorted(
        (r for r in results if not on_base(r)),
        key=lambda r: (
            keys.index((r.cell["model"], r.cell["hook"], r.cell["sae"])),
            compressions.index(r.cell["compression"]),
            source_order(r),
        ),
    )
    if not cells:
        return ""
    metrics = columns(cells, outputs, COST_QUALITY)
    head = [
        "hook",
        "sae",
        "compression",
        "source",
        *map(_cost_header, COST_COLUMNS),
        *(header(m, outputs) for m in metrics),
        "note",
    ]
    rows = [
        [
            r.cell["hook"],
            r.cell["sae"],
            r.cell["compression"],
            r.cell["source"],
            *[column.value(r.cost) for column in COST_COLUMNS],
            *[metric(r, m) for m in metrics],
            status_note(r),
        ]
        for r in cells
    ]
    return table(head, rows)


def legend_table(results: list[CellResult], outputs: Outputs) -> str:
    """What each metric column of these results is, from its declaration."""
    rows = legend_rows(columns(results, outputs), outputs)
    return table(["column", "key", "what", "aggregation", "range"], rows) if rows else ""


def _compressions(results: list[CellResult]) -> dict[str, dict]:
    """The compression details recorded with the cells, once per compression."""
    seen: dict[str, dict] = {}
    for r in results:
        details = r.details.get("compression")
        if details and details.get("compression") not in seen:
            seen[details["compression"]] = details
    return seen


def compression_table(results: list[CellResult]) -> str:
    """Achieved sparsity and relative weight error of every compressed layer, once per compression."""
    seen = _compressions(results)
    rows = []
    for name, details in seen.items():
        for layer in details.get("layers", []):
            rows.append(
                [
                    name,
                    layer["name"],
                    "x".join(map(str, layer["shape"])),
                    layer["sparsity"],
                    layer.get("rel_error"),
                    layer.get("n_m_ok"),
                    layer.get("max_distinct_per_group"),
                ]
            )
    header = ["compression", "layer", "shape", "sparsity", "rel. error", "N:M holds", "max distinct / group"]
    return table(header, rows) if rows else ""


def compression_summary(results: list[CellResult]) -> str:
    seen = _compressions(results)
    rows = []
    for name, details in seen.items():
        layers = details.get("layers", [])
        sparsities = [layer["sparsity"] for layer in layers]
        if sparsities:
            n_m = [layer.get("n_m_ok") for layer in layers if layer.get("n_m_ok") is not None]
            distinct = [layer["max_distinct_per_group"] for layer in layers if layer.get("max_distinct_per_group")]
            rel = [layer["rel_error"] for layer in layers if layer.get("rel_error") is not None]
            rows.append(
                [
                    name,
                    len(sparsities),
                    min(sparsities),
                    sum(sparsities) / len(sparsities),
                    max(sparsities),
                    max(rel) if rel else None,
                    f"{sum(n_m)}/{len(n_m)}" if n_m else None,
                    max(distinct) if distinct else None,
                    details.get("seconds"),
                ]
            )
    header = [
        "compression",
        "layers",
        "min sparsity",
        "mean sparsity",
        "max sparsity",
        "max rel. error",
        "N:M holds",
        "max distinct / group",
        "seconds",
    ]
    return table(header, rows) if rows else ""


@dataclass
class FigureEntry:
    """A figure of the report: written to ``path``, or skipped with the reason in ``note``."""

    title: str
    path: Path | None = None
    note: str | None = None


def figures_section(figures: list[FigureEntry], relative_to: Path) -> str:
    lines = []
    for f in figures:
        if f.path is not None:
            lines += [f"#### {f.title}", "", f"![{f.title}]({f.path.relative_to(relative_to).as_posix()})", ""]
        else:
            lines += [f"- {f.title}: skipped, {f.note}"]
    return "\n".join(lines).rstrip()


def markdown(
    title: str,
    results: list[CellResult],
    outputs: Outputs,
    *,
    layers: bool = False,
    note: str = "",
    figures: list[FigureEntry] | None = None,
    figures_dir: Path | None = None,
    phases: list[tuple[str, str, float, int]] | None = None,
) -> str:
    """The whole report of one matrix's results as markdown (figures only when given, already drawn).

    ``outputs`` declares the metric keys (``saex.run.outputs.declared_outputs``): which tables show a key, in
    what order, under what header; a mark's footnote follows the first table that shows it."""
    parts = [f"## {title}", ""] + ([note, ""] if note else [])
    if not results:
        return "\n".join(parts + ["No results yet."]) + "\n"
    if bf16 := precision_note(results):
        parts += [bf16, ""]
    printed: set[str] = set()

    def notes(names: Iterable[str]) -> list[str]:
        return [line for footnote in footnotes(names, outputs, printed) for line in (footnote, "")]

    parts += [
        "### Results per hook and compression",
        "",
        "Each table starts with the SAEs scored on the uncompressed model M (`original`, `loaded:*`: the "
        "references), then every SAE scored on the compressed model M_c. ↑ / ↓: higher / lower is better. "
        "value ± h: h is half the width of the value's confidence interval (bootstrap over eval blocks).",
        "",
        group_tables(results, outputs),
        "",
        *notes(columns(results, outputs, HEADLINE)),
    ]
    gap = transfer_gap_table(results, outputs)
    if gap:
        parts += [
            "### Transfer gap: the same SAE on M vs on M_c",
            "",
            "Δ = value on M_c - value on M: for a metric marked ↑, a negative Δ means the SAE explains the "
            "compressed model less well (for ↓, a positive one).",
            "",
            gap,
            "",
            *notes(gap_columns(transfer_gap_rows(results, in_order(outputs, GAP)), outputs)),
        ]
    differences = differences_table(results, outputs)
    if differences:
        parts += [
            "### Paired differences against the original",
            "",
            "Each SAE minus its `original` SAE, both scored on the same model, hook and eval tokens, with the "
            "percentile-bootstrap interval of the difference over the same resampled eval blocks.",
            "",
            differences,
            "",
            *notes(columns(results, outputs, paired_difference)),
        ]
    cost = cost_table(results, outputs)
    if cost:
        cells = [r for r in results if not on_base(r)]
        parts += ["### Cost vs quality", "", COST_NOTE, "", cost, "", *notes(columns(cells, outputs, COST_QUALITY))]

    parts += comparison_sections(results, outputs, notes)
    summary = compression_summary(results)
    if summary:
        parts += ["### Compression check (achieved, per targeted Linear layer)", "", summary, ""]
    if layers:
        layer_table = compression_table(results)
        if layer_table:
            parts += [layer_table, ""]
    if figures is not None:
        parts += ["### Figures", "", figures_section(figures, figures_dir or Path(".")) or "No figures.", ""]
    if phases:
        parts += ["### Time by phase", "", PHASES_NOTE, "", phase_table(phases), ""]
    legend = legend_table(results, outputs)
    if legend:
        parts += ["### Metrics", "", "What each metric column holds, as its metric declares it.", "", legend, ""]
    parts += ["### Every cell", "", cells_table(results, outputs), "", *notes(columns(results, outputs))]
    return "\n".join(parts).rstrip() + "\n"


PHASES_NOTE = (
    "Seconds each phase took, summed over every run of the matrix recorded in the store (a resumed run adds "
    "its own, mostly cache reads); a phase nested in another (M_c built while collecting its activations) "
    "counts once, as itself."
)


def precision_note(results: list[CellResult]) -> str:
    """A warning when model passes of some cells ran in bfloat16 (the matrix's ``precision``), else ''."""
    bf16 = sum(r.config.get("resolved", {}).get("run", {}).get("dtype") == "bfloat16" for r in results)
    if not bf16:
        return ""
    return (
        f"**bfloat16**: the model passes of {bf16} of {len(results)} cells ran in bfloat16 (the matrix's "
        "`precision`); float32 is the reference, docs/PERFORMANCE.md gives the deviation."
    )


def phase_table(phases: list[tuple[str, str, float, int]]) -> str:
    total = sum(seconds for _, _, seconds, _ in phases)
    rows = [
        [model, phase, f"{seconds:.1f}", f"{seconds / total:.0%}" if total else "", times]
        for model, phase, seconds, times in phases
    ]
    return table(["model", "phase", "seconds", "share", "times"], rows)


# --- writing a report folder ------------------------------------------------------------------------------


class ReportExists(FileExistsError):
    """Files of the report already exist in the output folder and overwriting was not asked for."""

    def __init__(self, paths: list[Path]):
        self.paths = paths
        shown = ", ".join(str(p) for p in paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
        super().__init__(f"{shown} already exist{'s' if len(paths) == 1 else ''}; pass --force to overwrite")


class ReportFolderError(ValueError):
    """The report's output folder names something that is not a folder (a file, or a path through a file)."""


@dataclass
class Section:
    """One matrix's part of a report: its title, its results, and a note shown under the title."""

    title: str
    results: list[CellResult]
    note: str = ""
    phases: list[tuple[str, str, float, int]] = field(default_factory=list)  # ResultsStore.phase_totals


@dataclass
class _Planned:
    title: str
    path: Path
    draw: Callable[[Path], Path]


def write_report(
    out_dir: Path,
    sections: list[Section],
    outputs: Outputs,
    *,
    layers: bool = False,
    force: bool = False,
    features: str | None = None,
) -> list[Path]:
    """Write ``report.md``, the PNG figures of every section and the HTML site (``saex.report.site``: index.html and
    its assets; ``features`` links a feature browser) into ``out_dir``; return the paths written.

    Every file that would be written is checked first: if one exists and ``force`` is false, ``ReportExists``
    is raised and nothing is written. With several reports, figure names start with the report's title.
    """
    from saex.report import figures, site  # matplotlib, jinja2 and plotly load only when a report folder is written

    out_dir = Path(out_dir)
    for folder in (out_dir, *out_dir.parents):  # the nearest existing one must be a folder; nothing is written
        if folder.exists() or folder.is_symlink():
            if not folder.is_dir():
                kind = "a file" if folder.is_file() else "a broken link" if not folder.exists() else "a special file"
                where = "" if folder == out_dir else f" (on the way to {out_dir})"
                raise ReportFolderError(f"{folder}: is {kind}, not a folder{where}; --out names the report's folder")
            break
    planned: list[tuple[list[_Planned], list[FigureEntry]]] = []
    for section in sections:
        prefix = slug(section.title) + "-" if len(sections) > 1 else ""
        draws, skipped = figures.plan(section.results, outputs, out_dir, prefix)
        planned.append(([_Planned(t, p, d) for t, p, d in draws], [FigureEntry(t, note=n) for t, n in skipped]))
    report_path = out_dir / "report.md"
    targets = [report_path, out_dir / site.INDEX, *site.asset_paths(out_dir)]
    targets += [p.path for draws, _ in planned for p in draws]
    if not force and (existing := [p for p in targets if p.exists()]):
        raise ReportExists(existing)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    texts = []
    for section, (draws, skipped) in zip(sections, planned):
        entries = []
        for p in draws:
            written.append(p.draw(p.path))
            entries.append(FigureEntry(p.title, path=p.path))
        texts.append(
            markdown(
                section.title,
                section.results,
                outputs,
                layers=layers,
                note=section.note,
                figures=entries + skipped,
                figures_dir=out_dir,
                phases=section.phases,
            )
        )
    report_path.write_text("\n".join(texts))
    parts = [site.SitePart(s.title, s.results, text, s.note) for s, text in zip(sections, texts)]
    return [report_path, *written, *site.write_site(out_dir, parts, outputs, features=features)]
