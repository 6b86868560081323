"""The report: grouped tables, transfer gap and cost tables, PNG figures, skipped figures, and a report folder
that is never overwritten without --force. Built on hand-made results (no model runs)."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

from saex import MetricOutput, NoParams, hookimpl
from saex.cli import main
from saex.config.matrix import BASE
from saex.plugin.manager import load_plugins
from saex.report.columns import GAP, in_order
from saex.report.markdown import Section, markdown, transfer_gap_rows, write_report
from saex.run.outputs import declared_outputs
from saex.storage.results import CellResult, ResultsStore

HOOK = "layers.4.resid_post"
COMPRESSIONS = ("wanda-50", "gptq-w4")
SOURCES = ("original", "retrained", "pruned:wanda@0.25", "pruned:wanda@0.5", "pruned:magnitude@0.5")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SITE_FILES = ["index.html", "site.css", "site.js", "features.js", "plotly.min.js"]  # the HTML site (saex.report.site)

# explained_variance / ce_loss_score / kl_div_score of each SAE source on M_c, per compression
QUALITY = {
    "wanda-50": {
        "original": (0.81, 0.93, 0.90),
        "retrained": (0.86, 0.97, 0.95),
        "pruned:wanda@0.25": (0.80, 0.92, 0.89),
        "pruned:wanda@0.5": (0.74, 0.88, 0.84),
        "pruned:magnitude@0.5": (0.66, 0.80, 0.77),
    },
    "gptq-w4": {
        "original": (0.88, 0.96, 0.94),
        "retrained": (0.89, 0.97, 0.95),
        "pruned:wanda@0.25": (0.87, 0.95, 0.93),
        "pruned:wanda@0.5": (0.82, 0.91, 0.89),
        "pruned:magnitude@0.5": (0.71, 0.84, 0.80),
    },
}
ON_M = (0.90, 0.98, 0.97)
NAMES = ("explained_variance", "ce_loss_score", "kl_div_score")
OUTPUTS = declared_outputs(load_plugins(entry_points=False))  # the built-in metrics' and the spine's


def cell(source: str, compression: str | None, *, hook: str = HOOK, matrix: str = "paper") -> dict:
    return {
        "matrix": matrix,
        "model": "smollm2",
        "compression": compression,
        "hook": hook,
        "sae": "topk",
        "source": source,
        "scored_on": BASE if compression is None else "compressed",
    }


def cost(source: str) -> dict:
    if source.startswith("pruned:"):
        return {
            "sae_seconds": 600.0,
            "sae_tokens": 4e6,
            "prune_seconds": 3.0,
            "calibration_tokens": 16384.0,
            "activation_seconds": 12.0,
        }
    return {"sae_seconds": 600.0 if source == "original" else 540.0, "sae_tokens": 4e6, "activation_seconds": 75.0}


def compression_details(name: str) -> dict:
    layers = [
        {"name": f"model.layers.{i}.mlp.up_proj", "shape": [1536, 576], "sparsity": 0.5, "rel_error": 0.3}
        for i in range(3)
    ]
    return {"compression": name, "seconds": 24.0, "layers": layers}


def synthetic_results(*, hook: str = HOOK, matrix: str = "paper") -> list[CellResult]:
    """original on M, then for 2 compressions: original, retrained and three pruned SAEs on M_c."""
    results = [
        CellResult(
            f"{hook}-ref",
            matrix,
            cell("original", None, hook=hook, matrix=matrix),
            "done",
            {**dict(zip(NAMES, ON_M)), "l0": 32.0, "mse": 1.5},
            cost("original"),
        )
    ]
    for compression in COMPRESSIONS:
        for source in SOURCES:
            values = dict(zip(NAMES, QUALITY[compression][source]))
            results.append(
                CellResult(
                    f"{hook}-{compression}-{source}",
                    matrix,
                    cell(source, compression, hook=hook, matrix=matrix),
                    "done",
                    {**values, "l0": 30.0, "mse": 2.0, "dec_match_mean_max_cos": 0.8},
                    cost(source),
                    {"compression": compression_details(compression)},
                )
            )
    return results


def section_of(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n###", start + len(heading))
    return text[start:] if end < 0 else text[start:end]


def row_of(table: str, *cells: str) -> list[str]:
    for line in table.splitlines():
        parts = [p.strip() for p in line.strip().strip("|").split("|")]
        if all(c in parts for c in cells):
            return parts
    raise AssertionError(f"no row with {cells} in\n{table}")


def is_png(path: Path, min_bytes: int = 8_000) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > min_bytes, (path, len(data))
    width, height = struct.unpack(">II", data[16:24])  # IHDR
    return width, height


def test_tables_group_per_hook_and_compression_with_the_reference_row():
    text = markdown("matrix paper", synthetic_results(), OUTPUTS)
    for compression in COMPRESSIONS:
        group = section_of(text, f"#### {HOOK} · {compression}")
        ref = row_of(group, "original", "M")
        assert ref[3] == "0.9"  # explained_variance of original on M, first metric column
        assert row_of(group, "pruned:wanda@0.5", "M_c")[3] == f"{QUALITY[compression]['pruned:wanda@0.5'][0]:.4g}"
        sources = [line.split("|")[2].strip() for line in group.splitlines() if line.startswith("| topk")]
        assert sources == [
            "original",
            "original",
            "retrained",
            "pruned:magnitude@0.5",
            "pruned:wanda@0.25",
            "pruned:wanda@0.5",
        ]
    # the zero-ablation caveat is written wherever ce_loss_score is
    assert "ce_loss_score†" in text and "ln(vocab)" in text
    assert text.count("| done |") == 11  # every cell exactly once, in the table of every cell


def test_transfer_gap_is_value_on_compressed_minus_value_on_base():
    rows = {row.compression: row for row in transfer_gap_rows(synthetic_results(), in_order(OUTPUTS, GAP))}
    on_m, on_mc, diff = rows["wanda-50"].values["explained_variance"]
    assert (on_m, on_mc) == (0.90, 0.81) and diff == pytest.approx(-0.09)
    gap = section_of(markdown("matrix paper", synthetic_results(), OUTPUTS), "### Transfer gap")
    row = row_of(gap, "wanda-50")
    assert row[3:13] == ["original", "0.9", "0.81", "-0.09", "0.98", "0.93", "-0.05", "0.97", "0.9", "-0.07"]
    assert row_of(gap, "gptq-w4")[6] == "-0.02"


def test_a_loaded_sae_is_a_reference_and_has_a_transfer_gap(tmp_path):
    loaded = "loaded:/saes/topk-l4"
    results = synthetic_results()
    results.append(CellResult("l-ref", "paper", cell(loaded, None), "done", dict(zip(NAMES, (0.7, 0.9, 0.8)))))
    for compression in COMPRESSIONS:
        results.append(
            CellResult(
                f"l-{compression}", "paper", cell(loaded, compression), "done", dict(zip(NAMES, (0.6, 0.85, 0.75)))
            )
        )
    text = markdown("matrix paper", results, OUTPUTS)
    group = section_of(text, f"#### {HOOK} · gptq-w4")
    assert row_of(group, loaded, "M")[3] == "0.7" and row_of(group, loaded, "M_c")[3] == "0.6"
    assert row_of(section_of(text, "### Transfer gap"), "gptq-w4", loaded)[4:7] == ["0.7", "0.6", "-0.1"]
    written = write_report(tmp_path, [Section("matrix paper", results)], OUTPUTS)
    assert is_png(next(p for p in written if p.name.startswith("transfer-gap")))


def test_cost_table_uses_pruning_seconds_for_pruned_sources():
    table = section_of(markdown("matrix paper", synthetic_results(), OUTPUTS), "### Cost vs quality")
    assert row_of(table, "wanda-50", "pruned:wanda@0.5")[4:9] == ["3", "1.638e+04", "12", "0.74", "0.88"]
    assert row_of(table, "wanda-50", "retrained")[4:7] == ["540", "4e+06", "75"]


def test_failed_cell_shows_the_first_line_of_its_error():
    results = synthetic_results()
    failed = next(r for r in results if r.cell["compression"] == "wanda-50" and r.cell["source"] == "pruned:wanda@0.25")
    failed.status, failed.metrics = "failed", {}
    failed.error = "CompressionMismatch: layer stayed dense\nTraceback (most recent call last): ..."
    text = markdown("matrix paper", results, OUTPUTS)
    group = section_of(text, f"#### {HOOK} · wanda-50")
    assert row_of(group, failed.cell["source"], "M_c")[-1] == "failed: CompressionMismatch: layer stayed dense"
    assert "Traceback" not in text


def test_report_folder_has_readable_figures(tmp_path):
    written = write_report(tmp_path / "out", [Section("matrix paper", synthetic_results())], OUTPUTS)
    # one figure per (kind, metric, hook, sae), named after them, metrics in their declared column order
    assert [p.name for p in written] == [
        "report.md",
        "sparsity-explained_variance-layers.4.resid_post-topk.png",
        "sparsity-ce_loss_score-layers.4.resid_post-topk.png",
        "sparsity-kl_div_score-layers.4.resid_post-topk.png",
        "transfer-gap-layers.4.resid_post-topk.png",
        "cost-explained_variance-layers.4.resid_post-topk.png",
        "cost-ce_loss_score-layers.4.resid_post-topk.png",
        *SITE_FILES,
    ]
    for path in written:
        if path.suffix == ".png":
            width, height = is_png(path)
            assert 600 <= width <= 2400 and 400 <= height <= 1600
    report = (tmp_path / "out" / "report.md").read_text()
    linked = re.findall(r"!\[[^]]*\]\(([^)]+)\)", report)
    assert sorted(linked) == sorted(p.name for p in written if p.suffix == ".png")
    # only the figures whose data these results do not hold (survival, fine-tuning, sweeps) are skipped
    skipped = [line for line in report.splitlines() if "skipped" in line]
    assert len(skipped) == 4 and all(
        any(reason in line for reason in ("survival profile", "no finetuned:", "single saes entry")) for line in skipped
    )


def with_loaded(results: list[CellResult]) -> list[CellResult]:
    """``results`` and a loaded SAE scored on M and on each M_c."""
    loaded = "loaded:/saes/topk-l4"
    found = [CellResult("l-ref", "paper", cell(loaded, None), "done", dict(zip(NAMES, (0.7, 0.9, 0.8))), cost(loaded))]
    found += [
        CellResult(f"l-{c}", "paper", cell(loaded, c), "done", dict(zip(NAMES, (0.6, 0.85, 0.75))), cost(loaded))
        for c in COMPRESSIONS
    ]
    return results + found


def test_one_palette_colours_a_source_kind_alike_in_every_figure(tmp_path, monkeypatch):
    """A colour per source kind (saex.report.cells.SOURCE_COLOURS: one hue each, several sources of a kind its
    shades), the same in the PNG figures (matplotlib) and the site's (plotly); the scored model has colours no
    source kind has."""
    from matplotlib.colors import to_hex

    from saex.report import figures, plots
    from saex.report.cells import COMPRESSION_COLOURS, SCORED_ON_M, SOURCE_COLOURS, source_colours, tint

    results = with_loaded(synthetic_results())
    key = ("smollm2", HOOK, "topk")
    hue = {kind: shades[0] for kind, shades in SOURCE_COLOURS.items()}
    assert len(set(hue.values())) == len(hue) and not {SCORED_ON_M, *COMPRESSION_COLOURS} & {
        c for shades in SOURCE_COLOURS.values() for c in shades
    }
    assert source_colours(SOURCES) == {
        "original": hue["original"],
        "retrained": hue["retrained"],
        "pruned:magnitude@0.5": hue["pruned"],  # table order: by strategy, then sparsity
        "pruned:wanda@0.25": SOURCE_COLOURS["pruned"][1],
        "pruned:wanda@0.5": SOURCE_COLOURS["pruned"][2],
    }
    drawn = {}
    monkeypatch.setattr(figures, "save", lambda fig, path: drawn.setdefault(path.stem, fig) and path)

    def legend(name: str) -> dict[str, str]:
        (box,) = drawn[name].legends
        return {text.get_text(): to_hex(handle.get_color()) for text, handle in zip(box.texts, box.legend_handles)}

    figures.cost_quality_figure(results, OUTPUTS, "explained_variance", key, tmp_path / "cost.png")
    figures.sparsity_figure(results, OUTPUTS, "explained_variance", key, tmp_path / "sparsity.png")
    figures.transfer_gap_figure(results, OUTPUTS, key, tmp_path / "gap.png")
    on_mc = [r.cell["source"] for r in results if r.cell["compression"] == "wanda-50"]
    assert {s: c for s, c in legend("cost").items() if s != "original on M"} == source_colours(on_mc)
    assert legend("sparsity")["pruned: magnitude"] == hue["pruned"]
    assert legend("sparsity")["pruned: wanda"] == SOURCE_COLOURS["pruned"][1]
    assert legend("gap") == {
        "original SAE on M": tint(hue["original"]),
        "original SAE on M_c": hue["original"],
        "loaded:/saes/topk-l4 SAE on M": tint(hue["loaded"]),
        "loaded:/saes/topk-l4 SAE on M_c": hue["loaded"],
    }
    # the site's transfer gap: the same colours, each legend entry its own
    spec = plots.transfer_gap(results, OUTPUTS, key)
    shown = {t["name"]: t["marker"]["color"] for t in spec["data"] if t["showlegend"]}
    assert {f"{name.replace(' SAE', '')}": colour for name, colour in legend("gap").items()} == shown
    assert all(t["textfont"]["size"] >= plots.FONT and t["constraintext"] == "none" for t in spec["data"])
    # where a figure colours by the scored model (the explorer), M and each compression have colours of their own
    spec = plots.explorer(results, OUTPUTS, key)
    assert {t["name"]: t["marker"]["color"] for t in spec["data"]} == {
        "on M": SCORED_ON_M,
        "on M_c (wanda-50)": COMPRESSION_COLOURS[0],
        "on M_c (gptq-w4)": COMPRESSION_COLOURS[1],
    }
    histogram = plots.histogram([0.0, 1.0, 2.0], {"on M": [3, 1], "on M_c": [2, 2]})
    assert [t["marker"]["color"] for t in histogram["data"]] == [SCORED_ON_M, COMPRESSION_COLOURS[0]]
    assert histogram["layout"]["yaxis"]["dtick"] == 1  # log counts labelled at the decades only


def test_missing_data_skips_a_figure_with_a_note(tmp_path):
    results = [r for r in synthetic_results() if not r.cell["source"].startswith("pruned:")]
    for r in results:
        r.metrics.pop("ce_loss_score")
    written = write_report(tmp_path, [Section("matrix paper", results)], OUTPUTS)
    assert not any("sparsity" in p.name for p in written) and not any("ce_loss" in p.name for p in written)
    assert any("transfer-gap" in p.name for p in written) and any("cost-explained" in p.name for p in written)
    report = (tmp_path / "report.md").read_text()
    assert "- ce_loss_score vs SAE pruning sparsity: skipped, no cell has ce_loss_score" in report
    assert "- explained_variance vs SAE pruning sparsity: skipped, no pruned:<strategy>@<s> SAE sources" in report
    assert "- Cost vs quality (ce_loss_score): skipped, no cell has ce_loss_score" in report


def test_two_hooks_give_a_figure_each(tmp_path):
    results = synthetic_results() + synthetic_results(hook="layers.4.mlp_out")
    written = write_report(tmp_path, [Section("matrix paper", results)], OUTPUTS)
    assert sum("transfer-gap" in p.name for p in written) == 2
    text = (tmp_path / "report.md").read_text()
    assert "#### layers.4.mlp_out · gptq-w4" in text and "#### layers.4.resid_post · gptq-w4" in text


def store_with(path: Path, results: list[CellResult]) -> Path:
    store = ResultsStore(path)
    for r in results:
        assert store.claim(r.key, r.matrix, r.cell, {"cell": r.cell})
        store.finish(r)
    store.close()
    return path


def test_cli_out_refuses_to_overwrite_without_force(tmp_path, capsys):
    store = store_with(tmp_path / "r.sqlite", synthetic_results())
    out = tmp_path / "report"
    assert main(["report", "--store", str(store), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed[0] == str(out / "report.md") and len(printed) == 7 + len(SITE_FILES)
    before = {p: p.stat().st_mtime_ns for p in out.iterdir()}

    assert main(["report", "--store", str(store), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already exist" in err and "--force" in err
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == before

    (out / "report.md").unlink()  # a single file left in the way is enough to refuse
    (out / "report.md").write_text("mine")
    assert main(["report", "--store", str(store), "--out", str(out)]) == 2
    assert (out / "report.md").read_text() == "mine"

    assert main(["report", "--store", str(store), "--out", str(out), "--force"]) == 0
    assert "## matrix paper" in (out / "report.md").read_text()


def test_cli_report_without_out_prints_markdown(tmp_path, capsys):
    store = store_with(tmp_path / "r.sqlite", synthetic_results())
    assert main(["report", "--store", str(store), "--full"]) == 0
    out = capsys.readouterr().out
    assert "### Transfer gap" in out and "### Figures" not in out
    assert main(["report", "--store", str(store), "--force"]) == 2


class Faithfulness:
    """A third-party metric: its one output declares everything the report reads."""

    name = "faithfulness"
    description = "test: a metric the spine has never heard of"
    scope = "sae"
    Params = NoParams
    outputs = (
        MetricOutput(
            name="faith_rate",
            label="faith",
            description="share of tokens the SAE keeps faithful",
            aggregation="share of eval tokens",
            higher_is_better=False,
            unit="%",
            range=(0, 100),
            headline=True,
            gap=True,
            vs_sparsity=True,
            order=15,
            note="faith is measured on the first 100 tokens only.",
        ),
    )

    def compute(self, ctx, params):
        return {"faith_rate": 1.0}


class FaithPlugin:
    @staticmethod
    @hookimpl
    def register_metrics(register):
        register(Faithfulness())


def with_metric(results: list[CellResult], key: str) -> list[CellResult]:
    """Every done cell also holds ``key``: 10 on M, 10 + 10 * sparsity (or 12) on M_c."""
    for r in results:
        sparsity = float(r.cell["source"].partition("@")[2] or 0.2)
        r.metrics[key] = 10.0 if r.cell["compression"] is None else 10.0 + 10 * sparsity
    return results


def test_a_third_party_metric_is_reported_from_its_declaration_alone(tmp_path):
    outputs = declared_outputs(load_plugins([("faith", FaithPlugin)], entry_points=False))
    written = write_report(tmp_path, [Section("matrix paper", with_metric(synthetic_results(), "faith_rate"))], outputs)
    text = (tmp_path / "report.md").read_text()
    # headline column after explained_variance (order 15), with its label, note mark, unit and arrow; marks are
    # numbered in column order, so ce_loss_score's caveat (order 20) moves to the second mark
    group = section_of(text, f"#### {HOOK} · wanda-50")
    head = row_of(group, "sae", "source")
    assert head[3:6] == ["explained_variance ↑", "faith† (%) ↓", "ce_loss_score‡ ↑"]
    assert row_of(group, "pruned:wanda@0.5", "M_c")[4] == "15"
    tables = text[text.index("### Results per hook") : text.index("### Transfer gap")]
    assert "† faith is measured on the first 100 tokens only." in tables and "‡ ce_loss_score = " in tables
    # in the transfer gap, with Δ = 12 - 10, and its footnote printed once, under the first table
    assert row_of(section_of(text, "### Transfer gap"), "wanda-50")[7:10] == ["10", "12", "+2"]
    assert text.count("† faith is measured") == 1
    legend = row_of(section_of(text, "### Metrics"), "faith_rate")
    assert legend == [
        "faith† (%) ↓",
        "faith_rate",
        "share of tokens the SAE keeps faithful",
        "share of eval tokens",
        "[0, 100]",
    ]
    # and drawn against the SAE's pruning sparsity, under its key
    assert is_png(tmp_path / "sparsity-faith_rate-layers.4.resid_post-topk.png") and len(written) == 8 + len(SITE_FILES)


def test_an_undeclared_key_is_shown_marked_in_the_table_of_every_cell_only():
    text = markdown("matrix paper", with_metric(synthetic_results(), "mystery"), OUTPUTS)
    assert "mystery" not in text[text.index("### Results per hook") : text.index("### Transfer gap")]
    cells = section_of(text, "### Every cell")
    head = row_of(cells, "model", "hook")
    assert head[head.index("mse ↓") + 1] == "mystery?"  # after every declared column
    assert row_of(cells, "pruned:wanda@0.5", "M_c (wanda-50)")[head.index("mystery?")] == "15"
    assert cells.rstrip().endswith(
        "? not declared by any loaded metric (its plugin is not loaded, or it does not "
        "declare this key): shown as stored, with no direction, unit or description."
    )
    assert row_of(section_of(text, "### Metrics"), "mystery") == ["mystery?", "mystery", "not declared", "", ""]
