"""Reading a matrix's result rows for the report: which source a cell holds, where it was scored, its metric
values, the panels and groups the tables and figures are drawn per, the transfer-gap rows, and the markdown
table primitive. Every table, figure and page of the report reads cells through this module."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace

from saex.config.matrix import BASE
from saex.config.pretrained import SAE_LABEL, loaded_label
from saex.config.sources import Source, parse_source
from saex.storage.results import CellResult

Key = tuple[str, str, str]  # (model, hook, sae): one panel of the report
# one mark per SAE source kind, the same in the PNG figures (matplotlib) and the site's (plotly)
SOURCE_MARKS = {
    "original": ("o", "circle"),
    "loaded": ("D", "diamond"),
    "finetuned": ("v", "triangle-down"),
    "retrained": ("s", "square"),
    "pruned": ("^", "triangle-up"),
}
# One colour per SAE source kind, the same in every figure: the PNGs (matplotlib) and the site's (plotly). Each
# kind is one hue; where a figure holds several sources of a kind (pruned:wanda and pruned:magnitude, two loaded
# SAEs) they take its further shades, in table order (``source_colours``). A figure coloured by something else
# says so in its legend and draws it in colours no source kind has: the scored model (M in SCORED_ON_M, the
# compressions in COMPRESSION_COLOURS, by the matrix's order); a pruned SAE's strategy is a source (the pruned hue).
SOURCE_COLOURS = {
    "original": ("#1f77b4", "#0b4a80", "#6fa8dc", "#a9cce8"),  # blue
    "loaded": ("#9467bd", "#5e3a86", "#bb9ddb", "#d5c4ea"),  # purple
    "finetuned": ("#2ca02c", "#17661a", "#74c476", "#a6dba0"),  # green
    "retrained": ("#ff7f0e", "#b35400", "#fdae6b", "#fdd0a2"),  # orange
    "pruned": ("#d62728", "#8c1516", "#f07b72", "#f4aaa4"),  # red
}
OTHER_COLOURS = ("#7f7f7f", "#4d4d4d", "#b0b0b0")  # a source saex.config.sources does not know
SCORED_ON_M = "#3b3b3b"
COMPRESSION_COLOURS = ("#17becf", "#8c564b", "#e377c2", "#bcbd22", "#0f7c87", "#c49c94")
ON_M_TINT = 0.55  # a transfer-gap bar of an SAE on M: its colour on M_c mixed this much with white


def source_colours(sources: Iterable[str]) -> dict[str, str]:
    """Each source's colour (hex): its kind's (``SOURCE_COLOURS``), the kind's next shade for each further source of
    that kind, in table order."""
    taken: dict[str, int] = {}
    colours = {}
    for source in sorted(unique(sources), key=source_rank):
        kind = source_kind(source)
        shades = SOURCE_COLOURS.get(kind, OTHER_COLOURS)
        taken[kind] = taken.get(kind, -1) + 1
        colours[source] = shades[taken[kind] % len(shades)]
    return colours


def scored_colours(results: Iterable[CellResult]) -> dict[str, str]:
    """Where a figure colours by the scored model: ``M`` and each compression of ``results`` in matrix order, keyed
    by both its name and its ``scored_on`` label (``M_c (<compression>)``)."""
    compressions = unique(r.cell["compression"] for r in results if not on_base(r))
    colours = {"M": SCORED_ON_M}
    for i, compression in enumerate(compressions):
        colour = COMPRESSION_COLOURS[i % len(COMPRESSION_COLOURS)]
        colours |= {compression: colour, f"M_c ({compression})": colour}
    return colours


def tint(colour: str, share: float = ON_M_TINT) -> str:
    """``colour`` (``#rrggbb``) mixed with white: ``share`` of white."""
    channels = (int(colour[i : i + 2], 16) for i in (1, 3, 5))
    return "#" + "".join(f"{round(c + (255 - c) * share):02x}" for c in channels)


# --- reading cells ----------------------------------------------------------------------------------------


def source_of(text: str) -> Source | None:
    """The parsed SAE source, or None for a string ``saex.config.sources`` does not know (shown, never plotted)."""
    try:
        return parse_source(text)
    except ValueError:
        return None


def source_rank(text: str) -> tuple:
    """Table order: original, loaded, finetuned by tokens, retrained, then pruned by strategy and sparsity, then
    anything else; a seeded source after its unseeded one."""
    src = source_of(text)
    if src is None:
        return (5, text, 0.0, -1)
    rank = {"original": 0, "loaded": 1, "finetuned": 2, "retrained": 3, "pruned": 4}[src.kind]
    seed = -1 if src.seed is None else src.seed
    return (rank, src.pruner or src.path or "", src.sparsity or src.tokens or 0.0, seed)


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


def fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value).replace("|", "\\|")


def signed(value: float | None) -> str:
    return "" if value is None else f"{value:+.4g}"


def table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def status_note(result: CellResult) -> str:
    if result.status == "failed":
        return f"failed: {first_line(result.error)}"
    return "" if result.status == "done" else result.status


Gap = tuple[float | None, float | None, float | None]  # (value on M, value on M_c, M_c - M)


@dataclass
class GapRow:
    """One SAE scored on M and on M_c: per metric its value on both and the difference."""

    model: str
    hook: str
    sae: str
    compression: str
    source: str
    note: str
    values: dict[str, Gap]


def transfer_gap_rows(results: list[CellResult], names: list[str]) -> list[GapRow]:
    """Each SAE scored on M and on M_c (``original``, ``loaded:*``) per (model, hook, sae, compression): the
    values of ``names`` on both and the difference (M_c - M)."""
    rows = []
    for model, hook, sae in panels(results):
        for compression, cells in compressed(results, model, hook, sae).items():
            for transferred in sorted(
                (r for r in cells if (src := source_of(r.cell["source"])) and src.on_base_too), key=source_order
            ):
                source = transferred.cell["source"]
                ref = references(results, source).get((model, hook, sae))
                values: dict[str, Gap] = {}
                for m in names:
                    on_m, on_mc = metric(ref, m), metric(transferred, m)
                    values[m] = (on_m, on_mc, None if on_m is None or on_mc is None else on_mc - on_m)
                note = status_note(transferred) or ("" if ref else f"no {source} on M")
                rows.append(GapRow(model, hook, sae, compression, source, note, values))
    return rows


def scored_on(result: CellResult) -> str:
    """Where a cell's SAE was scored, as figures label it: ``M`` or ``M_c (<compression>)``."""
    return "M" if on_base(result) else f"M_c ({result.cell['compression']})"


def sae_label(result: CellResult) -> str:
    """The name a cell's SAE goes by: the matrix's ``saes`` entry, or, for an SAE that is or derives from a loaded
    one (``loaded:``, and ``retrained`` / ``finetuned`` / ``pruned`` in its matrix), the loaded SAE's own identity
    (``saex.config.pretrained.loaded_label``: format and release/id or file name), as the cell's details record it
    or, for rows stored before they did, as its config's resolved files say."""
    if isinstance(label := result.details.get(SAE_LABEL), str) and label:
        return label
    files = result.config.get("resolved", {}).get("loaded") if isinstance(result.config, dict) else None
    if isinstance(files, dict) and isinstance(files.get("format"), str) and isinstance(files.get("path"), str):
        return loaded_label(files["format"], files["path"])
    return result.cell["sae"]


def with_sae_labels(results: Iterable[CellResult]) -> list[CellResult]:
    """The rows as the report shows them: each cell's ``sae`` is its SAE's label (``sae_label``), so a loaded SAE
    and what derives from it are one panel of their own, named by the loaded SAE. Rows are copied, never changed
    (keys, sources and everything else as stored)."""
    return [r if (name := sae_label(r)) == r.cell["sae"] else replace(r, cell={**r.cell, "sae": name}) for r in results]


def source_kind(source: str) -> str:
    src = source_of(source)
    return src.kind if src else source.split(":", 1)[0]


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._]+", "-", text).strip("-").lower() or "x"
