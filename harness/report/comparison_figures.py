"""Figures that set SAEs against each other (docs/REPORT.md), drawn with ``saex.report.figures``'s helpers and
planned by its ``plan``:

- survival against firing frequency: per compression, the share of latents intact on M_c per decade of their
  firing density on M (``saex.analysis.survival`` profile in each cell's details), a line per SAE source;
- quality against fine-tuning tokens: each ``cost_quality`` output of ``original`` (0 tokens), the
  ``finetuned:<t>`` SAEs and ``retrained`` (at its training tokens), per compression;
- quality against L0: each ``cost_quality`` output against the sparsity output (declared ``match_factor``) for
  every cell of a (model, hook) with several ``saes`` entries, a line per sweep (``saex.config.sweeps``), source and
  scored model: the L0 axis a sparsity sweep is read along.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from matplotlib.lines import Line2D
from matplotlib.ticker import ScalarFormatter

from saex.analysis.survival import SURVIVAL_PROFILE
from saex.config.sweeps import sweep_of
from saex.report.cells import (
    SOURCE_COLOURS,
    Key,
    compressed,
    metric,
    on_base,
    panels,
    scored_colours,
    source_colours,
    source_of,
    source_rank,
    unique,
)
from saex.report.columns import COST_QUALITY, Outputs, header, in_order, short_label, sparsity_axis
from saex.report.drawing import REFERENCE_STYLES, SHAPE_ONLY, NoData, describe, grid, legend, marker, save
from saex.storage.results import CellResult

Draw = Callable[[Path], Path]
Add = Callable[
    [Callable[[Key | None], str], Callable[[Key], object], Callable[[Key, Path], Path], str, str | None, str], None
]
NameOf = Callable[[str, Key, str | None], Path]


# --- survival against firing frequency -------------------------------------------------------------------------


def _survival_data(results: list[CellResult], key: Key) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """compression -> source -> [(firing density on M, share intact)] at the middle (geometric) of each decade."""
    model, hook, sae = key
    data: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for compression, cells in compressed(results, model, hook, sae).items():
        for r in sorted(cells, key=lambda r: source_rank(r.cell["source"])):
            profile = r.details.get(SURVIVAL_PROFILE) if r.status == "done" else None
            if profile and profile.get("bins"):
                points = [((b["low"] * b["high"]) ** 0.5, b["intact"]) for b in profile["bins"]]
                data.setdefault(compression, {})[r.cell["source"]] = points
    if not data:
        raise NoData(f"no SAE on M_c with a survival profile (metric transfer) for {describe(key, False)}")
    return data


def survival_figure(results: list[CellResult], key: Key, path: Path) -> Path:
    """Share of latents intact on M_c against their firing density on M (log), a panel per compression."""
    data = _survival_data(results, key)
    sources = sorted({s for per in data.values() for s in per}, key=source_rank)
    colors = source_colours(sources)
    fig, axes = grid(len(data))
    for ax, (compression, per_source) in zip(axes, data.items()):
        for source, points in per_source.items():
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker=marker(source), color=colors[source], linewidth=1.8)
        ax.set_xscale("log")
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(compression, fontsize=11)
        ax.set_xlabel("firing density on M (decades)")
        ax.set_ylabel("share of latents intact on M_c")
        ax.grid(alpha=0.3, which="both")
    handles = [Line2D([], [], marker=marker(s), color=colors[s], linewidth=1.8, label=s) for s in sources]
    legend(fig, handles)
    fig.suptitle(f"Latent survival against firing frequency: {describe(key, False)}", fontsize=13)
    return save(fig, path)


# --- quality against fine-tuning tokens ------------------------------------------------------------------------

_Curve = dict[str, list[tuple[float, float]]]  # label -> (tokens, value)
FINETUNED = "original, fine-tuned"


def _finetune_data(results: list[CellResult], name: str, key: Key) -> dict[str, tuple[_Curve, dict[str, float]]]:
    """compression -> (label -> [(tokens, value of ``name``)], retrained source -> its value): a curve per seed
    from ``original`` (0 tokens) through its ``finetuned:<t>``, and a point per ``retrained`` at its training
    tokens; only compressions with a fine-tuned SAE."""
    model, hook, sae = key
    out: dict[str, tuple[_Curve, dict[str, float]]] = {}
    for compression, cells in compressed(results, model, hook, sae).items():
        curves: _Curve = {}
        retrained: dict[str, float] = {}
        for r in cells:
            src, value = source_of(r.cell["source"]), metric(r, name)
            if src is None or value is None:
                continue
            finetuned = FINETUNED + ("" if src.seed is None else f" (seed {src.seed})")
            if src.kind == "finetuned" and src.tokens is not None:
                curves.setdefault(finetuned, []).append((float(src.tokens), value))
            elif src.kind == "original":
                curves.setdefault(finetuned, []).append((0.0, value))
            elif src.kind == "retrained" and (tokens := r.cost.get("sae_tokens")):
                retrained[r.cell["source"]] = value
                curves[r.cell["source"]] = [(float(tokens), value)]
        kept = {label: sorted(points) for label, points in curves.items() if label in retrained or max(points)[0] > 0}
        if len(kept) > len(retrained):  # some original was fine-tuned
            out[compression] = (kept, retrained)
    if not out:
        raise NoData(f"no finetuned:<tokens> SAE with {name} for {describe(key, False)}")
    return out


def finetune_figure(results: list[CellResult], outputs: Outputs, name: str, key: Key, path: Path) -> Path:
    """``name`` against the tokens spent on M_c: fine-tuning the original (0 = the original, as transferred) and
    training from scratch (``retrained``, a square at its training tokens), a panel per compression. Fine-tuned
    curves take the finetuned sources' colour (a shade per seed), retrained SAEs the retrained ones'."""
    data = _finetune_data(results, name, key)
    labels = unique(label for curves, _ in data.values() for label in curves)
    tuned = [label for label in labels if label.startswith(FINETUNED)]
    shades = SOURCE_COLOURS["finetuned"]
    colors = {label: shades[i % len(shades)] for i, label in enumerate(tuned)}
    colors |= source_colours(label for label in labels if label not in colors)
    fig, axes = grid(len(data))
    for ax, (compression, (curves, retrained)) in zip(axes, data.items()):
        positive = [x for points in curves.values() for x, _ in points if x > 0]
        for label, points in curves.items():
            xs, ys = zip(*points)
            if label in retrained:
                ax.axhline(retrained[label], **REFERENCE_STYLES["retrained on M_c"])
                ax.scatter(xs, ys, s=80, marker=marker("retrained"), color=colors[label], edgecolor="black", zorder=3)
            else:
                ax.plot(xs, ys, marker=marker("finetuned"), color=colors[label], linewidth=2)
        ax.set_xscale("symlog", linthresh=min(positive))
        ax.set_title(compression, fontsize=11)
        ax.set_xlabel("SAE training tokens on M_c (0 = original)")
        ax.set_ylabel(header(name, outputs))
        ax.grid(alpha=0.3, which="both")
    handles = [
        Line2D(
            [],
            [],
            marker=marker("finetuned") if label.startswith(FINETUNED) else marker("retrained"),
            color=colors[label],
            label=label,
        )
        for label in labels
    ]
    legend(fig, handles)
    fig.suptitle(f"{short_label(name, outputs)} against tokens on M_c: {describe(key, False)}", fontsize=13)
    return save(fig, path)


# --- quality against L0 ----------------------------------------------------------------------------------------

_Line = tuple[str, str, str]  # (sweep, SAE source, scored on)
_Panels = dict[str, dict[_Line, list[tuple[float, float]]]]  # y -> line -> [(x, y)]


def _l0_data(results: list[CellResult], outputs: Outputs, x: str, model: str, hook: str) -> _Panels:
    """Per ``cost_quality`` output with data: (sweep, source, scored on) -> [(x, y)] sorted by x, for a (model,
    hook) with several ``saes`` entries."""
    cells = [r for r in results if (r.cell["model"], r.cell["hook"]) == (model, hook)]
    if len({r.cell["sae"] for r in cells}) < 2:
        raise NoData(f"a single saes entry at {hook}: no {x} axis (sweep a sparsity parameter: saex.config.sweeps)")
    panels_of: _Panels = {}
    for y in in_order(outputs, COST_QUALITY):
        for r in cells:
            if (xv := metric(r, x)) is not None and (yv := metric(r, y)) is not None:
                line = (sweep_of(r.cell["sae"]), r.cell["source"], "M" if on_base(r) else r.cell["compression"])
                panels_of.setdefault(y, {}).setdefault(line, []).append((xv, yv))
    if not panels_of:
        raise NoData(f"no cell at {hook} has {x} and a cost_quality output")
    return {y: {line: sorted(points) for line, points in lines.items()} for y, lines in panels_of.items()}


def l0_figure(results: list[CellResult], outputs: Outputs, x: str, model: str, hook: str, path: Path) -> Path:
    """Every ``cost_quality`` output against ``x`` (L0), one panel each: a point per cell, coloured by the scored
    model (``scored_colours``), marked by source kind, joined along each sweep."""
    data = _l0_data(results, outputs, x, model, hook)
    scored = unique(line[2] for lines in data.values() for line in lines)
    colors = scored_colours(results)
    fig, axes = grid(len(data))
    for ax, (y, lines) in zip(axes, data.items()):
        for (_, source, target), points in lines.items():
            xs, vs = zip(*points)
            ax.plot(xs, vs, marker=marker(source), color=colors[target], linewidth=1.2, markeredgecolor="black")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.set_xlabel(header(x, outputs))
        ax.set_ylabel(header(y, outputs))
        ax.set_title(short_label(y, outputs), fontsize=11)
        ax.grid(alpha=0.3, which="both")
    kinds = unique(src.kind for lines in data.values() for line in lines if (src := source_of(line[1])))
    handles = [Line2D([], [], marker="o", linestyle="", color=colors[s], label=f"on {s}") for s in scored]
    handles += [Line2D([], [], marker=marker(k), linestyle="", **SHAPE_ONLY, label=k) for k in kinds]
    legend(fig, handles)
    fig.suptitle(f"Quality against {short_label(x, outputs)}, every saes entry: {hook}", fontsize=13)
    return save(fig, path)


# --- what to draw -------------------------------------------------------------------------------------------------


def plan_comparisons(
    results: list[CellResult], outputs: Outputs, add: Add, name_of: NameOf
) -> tuple[list[tuple[str, Path, Draw]], list[tuple[str, str]]]:
    """Plan the figures of this module: the per-(hook, sae) ones through ``figures.plan``'s ``add``; the L0-axis
    ones, per (model, hook), returned as (draws, skipped)."""
    many_models = len({model for model, _, _ in panels(results)}) > 1
    add(
        lambda key: "Latent survival against firing frequency" + (f" ({describe(key, many_models)})" if key else ""),
        lambda key: _survival_data(results, key),
        lambda key, p: survival_figure(results, key, p),
        "survival",
        None,
        "no SAE on M_c has a survival profile (metric transfer)",
    )
    for name in in_order(outputs, COST_QUALITY):
        shown = short_label(name, outputs)
        add(
            lambda key, s=shown: (
                f"{s} against fine-tuning tokens" + (f" ({describe(key, many_models)})" if key else "")
            ),
            lambda key, n=name: _finetune_data(results, n, key),
            lambda key, p, n=name: finetune_figure(results, outputs, n, key, p),
            "finetune",
            name,
            "no finetuned:<tokens> sources in these results",
        )
    draws: list[tuple[str, Path, Draw]] = []
    skipped: list[tuple[str, str]] = []
    hooks = unique((model, hook) for model, hook, _ in panels(results))
    for x in in_order(outputs, sparsity_axis):
        shown = short_label(x, outputs)
        missing = []
        for model, hook in hooks:
            title = f"Quality against {shown} ({hook}" + (f", {model})" if many_models else ")")
            try:
                _l0_data(results, outputs, x, model, hook)
            except NoData as exc:
                missing.append((title, str(exc)))
                continue
            path = name_of("l0-axis", (model, hook, ""), x)
            draws.append((title, path, lambda p, m=model, h=hook, x=x: l0_figure(results, outputs, x, m, h, p)))
        if draws:
            skipped += missing
        elif missing:
            skipped.append((f"Quality against {shown}", "a single saes entry per hook (sweep one: saex.config.sweeps)"))
    return draws, skipped
