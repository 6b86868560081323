"""Report sections that set SAEs against each other, placed by the metrics' declarations (this module names no
metric):

- alignment with the ``original`` (outputs declared ``noise_floor``): every SAE's value under a first row, the
  seed noise floor, which holds the same value of the ``original@seed=<n>`` SAEs (their mean when several): an
  SAE at or below that row is no closer to the original than the original retrained with another seed.
- matched sparsity (outputs declared with a ``match_factor``, i.e. L0): every SAE of a ``saes`` entry at a hook,
  scored on M or an M_c, against that entry's ``original`` on M; a warning for each further apart than the
  factor (1.25 for L0, see the reconstruction metric). The members of a sweep (``saex.config.sweeps``) are separate
  entries, read along the L0 axis (a figure), never warned about against each other.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

from saex.report.cells import metric, on_base, panels, references, source_of, source_order, table, unique
from saex.report.columns import NOISE_FLOOR, Outputs, columns, header, in_order, short_label, sparsity_axis
from saex.storage.results import CellResult

Notes = Callable[[Iterable[str]], list[str]]  # footnotes of columns not yet explained (``report.markdown``)

ALIGNMENT_NOTE = (
    "Each SAE against the `original` of its hook and `saes` entry, latent to latent. The first row of each block "
    "is the seed noise floor: the same figure for the original trained again with another initialisation seed "
    "(`original@seed=<n>` in the matrix's sources). An SAE is closer to the original than seeds alone make it "
    "only where it is above that row. SAEs scored on both M and M_c are listed once (the SAE is the same)."
)


def comparison_sections(results: list[CellResult], outputs: Outputs, notes: Notes) -> list[str]:
    """The markdown of both sections (module doc), each only when some cell has what it shows."""
    parts: list[str] = []
    names = columns(results, outputs, NOISE_FLOOR)
    if names:
        table = alignment_table(results, outputs, names)
        parts += ["### Alignment with the original, beside the seed noise floor", "", ALIGNMENT_NOTE, "", table, ""]
        parts += notes(names)
    warnings = sparsity_warnings(results, outputs)
    if warnings:
        parts += ["### Matched sparsity", "", *warnings]
    return parts


def seed_floors(results: list[CellResult], key: tuple[str, str, str]) -> list[CellResult]:
    """The ``original@seed=<n>`` SAEs scored on M at (model, hook, sae)."""
    return [
        r
        for r in results
        if on_base(r)
        and (r.cell["model"], r.cell["hook"], r.cell["sae"]) == key
        and (src := source_of(r.cell["source"])) is not None
        and src.seed_floor
    ]


def _mean(values: list[float | None]) -> float | None:
    found = [v for v in values if v is not None]
    return sum(found) / len(found) if found else None


def alignment_table(results: list[CellResult], outputs: Outputs, names: list[str]) -> str:
    """Per (model, hook, sae): the seed-floor row, then every other SAE compared with the original."""
    many_models = len({model for model, _, _ in panels(results)}) > 1
    compressions = unique(r.cell["compression"] for r in results)
    rows: list[list[object]] = []
    for key in panels(results):
        model, hook, sae = key
        floors = seed_floors(results, key)
        compared = [
            r
            for r in results
            if (r.cell["model"], r.cell["hook"], r.cell["sae"]) == key
            and r not in floors
            and any(metric(r, n) is not None for n in names)
            and (on_base(r) or not ((src := source_of(r.cell["source"])) and src.on_base_too))
        ]
        if not compared and not floors:
            continue
        label = "seed floor: " + (", ".join(r.cell["source"] for r in floors) or "none (add original@seed=<n>)")
        where = [model] if many_models else []
        rows.append([*where, hook, sae, "", label, *(_mean([metric(r, n) for r in floors]) for n in names)])
        for r in sorted(compared, key=lambda r: (compressions.index(r.cell["compression"]), source_order(r))):
            compression = r.cell["compression"] or "—"
            rows.append([*where, hook, sae, compression, r.cell["source"], *(metric(r, n) for n in names)])
    head = ["model"] * many_models + ["hook", "sae", "compression", "source", *(header(n, outputs) for n in names)]
    return table(head, rows)


def sparsity_warnings(results: list[CellResult], outputs: Outputs) -> list[str]:
    """Lines of the matched-sparsity section per sparsity output: what is compared, and a warning per mismatch
    or a line saying there is none; empty when no cell can be compared."""
    lines: list[str] = []
    for name in in_order(outputs, sparsity_axis):
        factor, shown = outputs[name].match_factor, short_label(name, outputs)
        assert factor is not None
        found: list[str] = []
        checked = 0
        for key, original in references(results).items():
            base = metric(original, name)
            same = [r for r in results if (r.cell["model"], r.cell["hook"], r.cell["sae"]) == key and r is not original]
            for r in same if base is not None else []:
                if (value := metric(r, name)) is None:
                    continue
                checked += 1
                ratio = max(value, base) / min(value, base) if min(value, base) > 0 else math.inf
                if ratio > factor:
                    target = "M" if on_base(r) else f"M_c ({r.cell['compression']})"
                    found.append(
                        f"- ⚠ {key[1]} · {key[2]}/{r.cell['source']} on {target}: {shown} {value:.4g} against "
                        f"{base:.4g} for `original` on M ({ratio:.2f}x)"
                    )
        if checked:
            lines += [
                f"Every SAE of a `saes` entry at a hook is compared with that entry's `original` on M: {shown} more "
                f"than {factor:g}x apart mixes sparsity into the quality differences read above.",
                "",
                *(found or [f"All {checked} SAEs are within {factor:g}x of their original's {shown}."]),
                "",
            ]
    return lines
