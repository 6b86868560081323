"""Results -> a markdown report (and, with an output folder, PNG figures): docs/REPORT.md says what each shows.

The tables are grouped per (hook, compression) with the SAEs scored on M (``original``, ``loaded:*``) repeated
in every group as references; then the transfer gap (the same SAE on M vs on M_c), cost vs quality, the
compression check, and every cell as stored. ``write_report`` writes ``report.md`` and the figures of
``harness/figures.py`` into a folder and never replaces a file there unless asked to (results are never
silently overwritten).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from saex.matrix import BASE
from saex.sources import Source, parse_source
from saex.store import CellResult

# Headline metrics first, then the rest in a fixed order; metrics not listed follow, sorted by name.
METRIC_COLUMNS = (
    "explained_variance",
    "ce_loss_score",
    "ce_loss_score_mean",
    "kl_div_score",
    "kl_div_score_mean",
    "l0",
    "dead_frac",
    "dense_frac",
    "mse",
    "cos",
    "l2_ratio",
    "l1",
    "ce_clean",
    "ce_sae",
    "ce_ablated",
    "ce_mean_ablated",
    "kl_sae",
    "kl_ablated",
    "kl_mean_ablated",
    "model_ce",
    "model_ppl",
)
GAP_METRICS = ("explained_variance", "ce_loss_score", "ce_loss_score_mean", "kl_div_score")
COST_METRICS = ("explained_variance", "ce_loss_score")
ABLATION_MARK = "†"
ABLATION_NOTE = (
    f"{ABLATION_MARK} ce_loss_score = (ce_ablated - ce_sae) / (ce_ablated - ce_clean), with the hook zero-ablated "
    "for ce_ablated. Zero-ablating a residual-stream hook (resid_pre / resid_post) of a bias-free model makes "
    "every later layer see zeros: the logits are uniform and ce_ablated = ln(vocab) for every model, compressed "
    "or not, so the score's baseline says nothing about the hook (docs/METRICS.md). ce_loss_score_mean "
    "and kl_div_score_mean use the hook's mean activation over the eval tokens as the baseline instead."
)
COST_NOTE = (
    "Seconds to obtain the SAE: training for `original` (paid once, on M, whatever the compression) and "
    "`retrained`; calibration + pruning for `pruned:*` (the original's training not included). Activation "
    "seconds: the model pass that collected the activations it was trained or calibrated on (M's for "
    "`original`; shared by the hooks collected in the same pass)."
)


# --- reading cells ----------------------------------------------------------------------------------------


def source_of(text: str) -> Source | None:
    """The parsed SAE source, or None for a string ``saex.sources`` does not know (shown, never plotted)."""
    try:
        return parse_source(text)
    except ValueError:
        return None


def source_rank(text: str) -> tuple:
    """Table order: original, loaded, retrained, then pruned by strategy and sparsity, then anything else."""
    src = source_of(text)
    if src is None:
        return (4, text, 0.0)
    rank = {"original": 0, "loaded": 1, "retrained": 2, "pruned": 3}[src.kind]
    return (rank, src.pruner or src.path or "", src.sparsity or 0.0)


def source_order(result: CellResult) -> tuple:
    return source_rank(result.cell["source"])


def is_pruned(result: CellResult) -> bool:
    src = source_of(result.cell["source"])
    return src is not None and src.kind == "pruned"


def on_base(result: CellResult) -> bool:
    return result.cell["scored_on"] == BASE


def metric(result: CellResult | None, name: str) -> float | None:
    """A finite metric of a finished cell, else None (missing, NaN, failed or still running)."""
    if result is None or result.status != "done":
        return None
    value = result.metrics.get(name)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def obtain_seconds(result: CellResult) -> float | None:
    """Seconds to obtain the cell's SAE: pruning (with calibration) for pruned sources, else training."""
    if is_pruned(result) and "prune_seconds" in result.cost:
        return result.cost["prune_seconds"]
    return result.cost.get("sae_seconds")


def obtain_tokens(result: CellResult) -> float | None:
    if is_pruned(result) and "calibration_tokens" in result.cost:
        return result.cost["calibration_tokens"]
    return result.cost.get("sae_tokens")


def unique(values: Iterable) -> list:
    """Distinct values in order of first appearance (the matrix's order)."""
    return list(dict.fromkeys(values))


def references(results: list[CellResult], source: str = "original") -> dict[tuple[str, str, str], CellResult]:
    """``source`` (``original`` unless said) on M per (model, hook, sae): what its cells on M_c are compared with."""
    return {
        (r.cell["model"], r.cell["hook"], r.cell["sae"]): r
        for r in results
        if on_base(r) and r.cell["source"] == source
    }


def base_rows(results: list[CellResult], model: str, hook: str) -> list[CellResult]:
    """Every SAE scored on M at (model, hook): ``original`` and ``loaded:*``, the references of their groups."""
    return [r for r in results if on_base(r) and r.cell["model"] == model and r.cell["hook"] == hook]


def compressed(results: list[CellResult], model: str, hook: str, sae: str | None = None) -> dict[str, list[CellResult]]:
    """Cells scored on M_c for (model, hook[, sae]), per compression in matrix order."""
    groups: dict[str, list[CellResult]] = {}
    for r in results:
        c = r.cell
        if not on_base(r) and c["model"] == model and c["hook"] == hook and (sae is None or c["sae"] == sae):
            groups.setdefault(c["compression"], []).append(r)
    return groups


def panels(results: list[CellResult]) -> list[tuple[str, str, str]]:
    """Every (model, hook, sae) in the results, in matrix order."""
    return unique((r.cell["model"], r.cell["hook"], r.cell["sae"]) for r in results)


def first_line(error: str | None, limit: int = 100) -> str:
    line = (error or "").strip().splitlines()[0] if (error or "").strip() else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


# --- markdown ---------------------------------------------------------------------------------------------


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value).replace("|", "\\|")


def _signed(value: float | None) -> str:
    return "" if value is None else f"{value:+.4g}"


def _table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _metric_names(results: list[CellResult]) -> list[str]:
    present = {k for r in results for k in r.metrics}
    return [m for m in METRIC_COLUMNS if m in present] + sorted(present - set(METRIC_COLUMNS))


def _header(name: str) -> str:
    return name + ABLATION_MARK if name == "ce_loss_score" else name


def _status_note(result: CellResult) -> str:
    if result.status == "failed":
        return f"failed: {first_line(result.error)}"
    return "" if result.status == "done" else result.status


def cells_table(results: list[CellResult]) -> str:
    """Every cell as stored: one row each, with its status (and a failed cell's first error line)."""
    metrics = _metric_names(results)
    header = ["model", "hook", "sae", "source", "scored on", *map(_header, metrics), "sae seconds", "status"]
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
                *[r.metrics.get(m) for m in metrics],
                obtain_seconds(r),
                status,
            ]
        )
    return _table(header, rows)


def group_tables(results: list[CellResult]) -> str:
    """One table per (hook, compression): the SAEs scored on M first (references), then every SAE on M_c."""
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
            metrics = _metric_names(rows_of)
            header = ["sae", "source", "scored on", *map(_header, metrics), "seconds to obtain", "note"]
            rows = [
                [
                    r.cell["sae"],
                    r.cell["source"],
                    "M" if on_base(r) else "M_c",
                    *[r.metrics.get(m) for m in metrics],
                    obtain_seconds(r),
                    _status_note(r),
                ]
                for r in rows_of
            ]
            where = f"{hook} · {compression or 'no compression'}" + (f" · {model}" if len(models) > 1 else "")
            parts += [f"#### {where}", "", _table(header, rows), ""]
    return "\n".join(parts).rstrip()


def transfer_gap_rows(results: list[CellResult]) -> list[dict]:
    """Each SAE scored on M and on M_c (``original``, ``loaded:*``) per (model, hook, sae, compression):
    values on both and the difference (M_c - M)."""
    rows = []
    for model, hook, sae in panels(results):
        for compression, cells in compressed(results, model, hook, sae).items():
            for transferred in sorted(
                (r for r in cells if (src := source_of(r.cell["source"])) and src.on_base_too), key=source_order
            ):
                source = transferred.cell["source"]
                ref = references(results, source).get((model, hook, sae))
                row: dict = {
                    "model": model,
                    "hook": hook,
                    "sae": sae,
                    "compression": compression,
                    "source": source,
                    "note": _status_note(transferred) or ("" if ref else f"no {source} on M"),
                }
                for m in GAP_METRICS:
                    on_m, on_mc = metric(ref, m), metric(transferred, m)
                    row[m] = (on_m, on_mc, None if on_m is None or on_mc is None else on_mc - on_m)
                rows.append(row)
    return rows


def transfer_gap_table(results: list[CellResult]) -> str:
    rows = transfer_gap_rows(results)
    metrics = [m for m in GAP_METRICS if any(row[m][0] is not None or row[m][1] is not None for row in rows)]
    if not rows or not metrics:
        return ""
    multi = len({row["model"] for row in rows}) > 1
    header = (["model"] if multi else []) + ["hook", "sae", "compression", "source"]
    for m in metrics:
        header += [f"{_header(m)} on M", "on M_c", "Δ"]
    table = []
    for row in rows:
        cells: list[object] = ([row["model"]] if multi else []) + [
            row["hook"],
            row["sae"],
            row["compression"],
            row["source"],
        ]
        for m in metrics:
            on_m, on_mc, diff = row[m]
            cells += [on_m, on_mc, _signed(diff)]
        table.append(cells + [row["note"]])
    return _table(header + ["note"], table)


def cost_table(results: list[CellResult]) -> str:
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
    metrics = [m for m in COST_METRICS if any(m in r.metrics for r in cells)]
    header = [
        "hook",
        "sae",
        "compression",
        "source",
        "seconds to obtain",
        "tokens",
        "activation seconds",
        *map(_header, metrics),
        "note",
    ]
    rows = [
        [
            r.cell["hook"],
            r.cell["sae"],
            r.cell["compression"],
            r.cell["source"],
            obtain_seconds(r),
            obtain_tokens(r),
            r.cost.get("activation_seconds"),
            *[metric(r, m) for m in metrics],
            _status_note(r),
        ]
        for r in cells
    ]
    return _table(header, rows)


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
    return _table(header, rows) if rows else ""


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
    return _table(header, rows) if rows else ""


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
    *,
    layers: bool = False,
    note: str = "",
    figures: list[FigureEntry] | None = None,
    figures_dir: Path | None = None,
) -> str:
    """The whole report of one matrix's results as markdown (figures only when given, already drawn)."""
    parts = [f"## {title}", ""] + ([note, ""] if note else [])
    if not results:
        return "\n".join(parts + ["No results yet."]) + "\n"
    has_ce = any("ce_loss_score" in r.metrics for r in results)
    parts += [
        "### Results per hook and compression",
        "",
        "Each table starts with the SAEs scored on the uncompressed model M (`original`, `loaded:*`: the "
        "references), then every SAE scored on the compressed model M_c.",
        "",
        group_tables(results),
        "",
    ]
    if has_ce:
        parts += [ABLATION_NOTE, ""]
    gap = transfer_gap_table(results)
    if gap:
        parts += [
            "### Transfer gap: the same SAE on M vs on M_c",
            "",
            "Δ = value on M_c - value on M (negative: the SAE explains the compressed model less well).",
            "",
            gap,
            "",
        ]
    cost = cost_table(results)
    if cost:
        parts += ["### Cost vs quality", "", COST_NOTE, "", cost, ""]
    summary = compression_summary(results)
    if summary:
        parts += ["### Compression check (achieved, per targeted Linear layer)", "", summary, ""]
    if layers:
        layer_table = compression_table(results)
        if layer_table:
            parts += [layer_table, ""]
    if figures is not None:
        parts += ["### Figures", "", figures_section(figures, figures_dir or Path(".")) or "No figures.", ""]
    parts += ["### Every cell", "", cells_table(results)]
    return "\n".join(parts) + "\n"


# --- writing a report folder ------------------------------------------------------------------------------


class ReportExists(FileExistsError):
    """Files of the report already exist in the output folder and overwriting was not asked for."""

    def __init__(self, paths: list[Path]):
        self.paths = paths
        shown = ", ".join(str(p) for p in paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
        super().__init__(f"{shown} already exist{'s' if len(paths) == 1 else ''}; pass --force to overwrite")


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._]+", "-", text).strip("-").lower() or "x"


@dataclass
class Section:
    """One matrix's part of a report: its title, its results, and a note shown under the title."""

    title: str
    results: list[CellResult]
    note: str = ""


@dataclass
class _Planned:
    title: str
    path: Path
    draw: Callable[[Path], Path]


def write_report(out_dir: Path, sections: list[Section], *, layers: bool = False, force: bool = False) -> list[Path]:
    """Write ``report.md`` and the PNG figures of every section into ``out_dir``; return the paths written.

    Every file that would be written is checked first: if one exists and ``force`` is false, ``ReportExists``
    is raised and nothing is written. With several reports, figure names start with the report's title.
    """
    from saex import figures  # matplotlib loads only when figures are drawn

    out_dir = Path(out_dir)
    planned: list[tuple[list[_Planned], list[FigureEntry]]] = []
    for section in sections:
        prefix = slug(section.title) + "-" if len(sections) > 1 else ""
        draws, skipped = figures.plan(section.results, out_dir, prefix)
        planned.append(([_Planned(t, p, d) for t, p, d in draws], [FigureEntry(t, note=n) for t, n in skipped]))
    report_path = out_dir / "report.md"
    targets = [report_path] + [p.path for draws, _ in planned for p in draws]
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
                layers=layers,
                note=section.note,
                figures=entries + skipped,
                figures_dir=out_dir,
            )
        )
    report_path.write_text("\n".join(texts))
    return [report_path, *written]
