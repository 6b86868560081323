"""Results -> markdown tables: one row per cell (metrics and cost), and the per-layer compression check."""

from __future__ import annotations

from harness.matrix import BASE
from harness.store import CellResult

METRIC_COLUMNS = ("explained_variance", "mse", "cos", "l2_ratio", "l0", "dead_frac", "dense_frac")


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def cells_table(results: list[CellResult]) -> str:
    metrics = [m for m in METRIC_COLUMNS if any(m in r.metrics for r in results)]
    extra = sorted({k for r in results for k in r.metrics} - set(metrics))
    header = ["model", "hook", "sae", "source", "scored on", *metrics, *extra, "sae seconds", "status"]
    rows = []
    for r in results:
        c = r.cell
        target = "M" if c["scored_on"] == BASE else f"M_c ({c['compression']})"
        status = r.status if not r.error else f"{r.status}: {r.error.splitlines()[0][:80]}"
        rows.append([c["model"], c["hook"], c["sae"], c["source"], target,
                     *[r.metrics.get(m) for m in metrics + extra], r.cost.get("sae_seconds"), status])
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
            rows.append([name, layer["name"], "x".join(map(str, layer["shape"])), layer["sparsity"], layer.get("rel_error")])
    return _table(["compression", "layer", "shape", "sparsity", "rel. error"], rows) if rows else ""


def compression_summary(results: list[CellResult]) -> str:
    seen = _compressions(results)
    rows = []
    for name, details in seen.items():
        sparsities = [layer["sparsity"] for layer in details.get("layers", [])]
        if sparsities:
            rows.append([name, len(sparsities), min(sparsities), sum(sparsities) / len(sparsities), max(sparsities),
                         details.get("seconds")])
    header = ["compression", "layers", "min sparsity", "mean sparsity", "max sparsity", "seconds"]
    return _table(header, rows) if rows else ""


def markdown(title: str, results: list[CellResult], *, layers: bool = False) -> str:
    parts = [f"## {title}", "", cells_table(results)]
    summary = compression_summary(results)
    if summary:
        parts += ["", "### Compression check (achieved, per targeted Linear layer)", "", summary]
    if layers:
        parts += ["", compression_table(results)]
    return "\n".join(parts) + "\n"
