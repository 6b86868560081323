"""The compact terminal summary (saex.report.summary): what `saex run` ends with and `saex report MATRIX` prints
without --out. A tiny matrix with the smoke matrix's sources and metrics (original and retrained; reconstruction,
transfer, CE/KL) through the CLI: no line over 100 columns, every value as its row holds it, `saex report` printing
the same; and hand-made rows with long names, a failed cell and paired differences, compared line by line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import tiny3_matrix, tiny3_sections

from saex.cli import main
from saex.config.matrix import BASE
from saex.plugin.manager import load_plugins
from saex.report.summary import WIDTH, next_steps, summary, summary_columns
from saex.run.outputs import declared_outputs
from saex.storage.results import CellResult, ResultsStore

OUTPUTS = declared_outputs(load_plugins(entry_points=False))
SMOKE_COLUMNS = [
    "explained_variance",
    "ce_loss_score",
    "ce_loss_score_mean",
    "kl_div_score",
    "kl_div_score_mean",
    "l0",
]


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAEX_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SAEX_STORE", raising=False)


def smoke_like_registry(tmp_path: Path, text_corpus: Path) -> Path:
    """The smoke matrix's shape on the tiny Llama: one hook, magnitude 50%, original and retrained, the
    reconstruction, transfer and CE/KL metrics."""
    data = {
        **tiny3_sections(text_corpus, 2048),
        "metrics": {
            "rec": {"plugin": "reconstruction"},
            "tr": {"plugin": "transfer"},
            "cekl": {"plugin": "ce_kl", "params": {"max_tokens": 256}},
        },
        "matrices": {
            "t": tiny3_matrix(
                sources=["original", "retrained"],
                metrics=["rec", "tr", "cekl"],
                tokens={"train": 2048, "calibration": 512, "eval": 512},
            )
        },
    }
    path = tmp_path / "reg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def columns_of(line: str) -> list[str]:
    """A table line's cells (separated by two or more spaces)."""
    return [part.strip() for part in line.split("  ") if part.strip()]


def interval(metrics: dict, name: str, signed: bool = False) -> str:
    low, high = metrics[f"{name}_ci_low"], metrics[f"{name}_ci_high"]
    text = f"{metrics[name]:{'+' if signed else ''}.4g} ± {(high - low) / 2:.2g}"
    return text + "°" if signed and low <= 0 <= high else text


def test_run_ends_with_the_summary_in_100_columns_and_report_prints_the_same(tmp_path, text_corpus, capsys):
    reg, store = smoke_like_registry(tmp_path, text_corpus), tmp_path / "r.sqlite"
    assert main(["run", "t", "--registry", str(reg), "--store", str(store), "--no-progress"]) == 0
    out = capsys.readouterr().out
    table, steps = out.rstrip("\n").split("\n\nresults:")
    lines = table.splitlines()
    assert max(map(len, lines)) <= WIDTH
    assert ("results:" + steps).splitlines() == [
        f"results:     {store}",
        f"full report: saex report t --registry {reg} --store {store} --full",
        f"HTML site:   saex report t --registry {reg} --store {store} --out reports/t",
        f"an SAE:      saex export --key KEY --registry {reg} --store {store} --out DIR",
    ]
    rows = {(r.cell["source"], r.cell["scored_on"]): r for r in ResultsStore.existing(store).rows("t")}
    ref, transferred, retrained = (
        rows[("original", BASE)],
        rows[("original", "compressed")],
        rows[("retrained", "compressed")],
    )
    assert summary_columns(list(rows.values()), OUTPUTS) == SMOKE_COLUMNS
    assert lines[:3] == ["matrix t: 3 cells, 3 done", "", "layers.1.resid_post · SAE small · M_c = mag"]
    # two bands of three metrics, each the same five rows: three cells and the Δ under the two on M_c
    bands = [lines[3:9], lines[10:16]]
    assert lines[9] == "" and lines[16] == ""
    for band, names in zip(bands, (SMOKE_COLUMNS[:3], SMOKE_COLUMNS[3:])):
        head, on_m, on_mc, gap, again, delta = (columns_of(line) for line in band)
        labels = {"l0": "l0 (latents)"}
        assert head == ["key", "source", "scored on", *(labels.get(n, n) + (" ↑" if n != "l0" else "") for n in names)]
        assert on_m == [ref.key[:8], "original", "M", *(interval(ref.metrics, n) for n in names)]
        assert on_mc == [transferred.key[:8], "original", "M_c", *(interval(transferred.metrics, n) for n in names)]
        assert gap == ["Δ vs M", *(f"{transferred.metrics[n] - ref.metrics[n]:+.4g}" for n in names)]
        assert again == [retrained.key[:8], "retrained", "M_c", *(interval(retrained.metrics, n) for n in names)]
        expected = [interval(retrained.metrics, f"{n}_vs_original", signed=True) for n in names]
        assert delta == ["Δ vs original", *expected]
    assert lines[17].startswith("↑ / ↓: higher / lower is better.")

    assert main(["report", "t", "--registry", str(reg), "--store", str(store)]) == 0
    assert capsys.readouterr().out == out  # the same compact view
    assert main(["report", "t", "--registry", str(reg), "--store", str(store), "--full"]) == 0
    full = capsys.readouterr().out
    assert full.startswith("## matrix t\n") and "### Every cell" in full
    assert main(["report", "t", "--registry", str(reg), "--store", str(store), "--full", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == ("saex: error: --full prints the report; with --out it is written to report.md\n")


def row(key: str, source: str, compression: str | None, metrics: dict, **fields: object) -> CellResult:
    cell = {
        "matrix": "m",
        "model": "smollm2",
        "compression": compression,
        "hook": "layers.9.resid_post",
        "sae": "topk-8x",
        "source": source,
        "scored_on": BASE if compression is None else "compressed",
    }
    return CellResult(key, "m", cell, fields.pop("status", "done"), metrics, **fields)


def with_ci(name: str, value: float, half: float) -> dict:
    return {name: value, f"{name}_ci_low": value - half, f"{name}_ci_high": value + half}


def test_summary_lines_exactly():
    results = [
        row("aaaa1111bbbb", "original", None, with_ci("explained_variance", 0.834, 0.008) | with_ci("l0", 32.0, 0)),
        row("cccc2222dddd", "original", "magnitude-50", with_ci("explained_variance", 0.598, 0.006) | {"l0": 32.0}),
        row(
            "eeee3333ffff",
            "retrained",
            "magnitude-50",
            with_ci("explained_variance", 0.8266, 0.0075)
            | with_ci("explained_variance_vs_original", 0.2286, 0.0052)
            | with_ci("l0_vs_original", 0.0, 0.5)
            | {"l0": 30.0},
        ),
        row(
            "9999aaaa0000", "pruned:wanda@0.5", "magnitude-50", {}, status="failed", error="RuntimeError: " + "x" * 200
        ),
    ]
    text = summary("matrix m", results, OUTPUTS)
    assert text.splitlines()[:11] == [
        "matrix m: 4 cells, 3 done, 1 failed",
        "",
        "layers.9.resid_post · SAE topk-8x · M_c = magnitude-50",
        "key       source            scored on  explained_variance ↑  l0 (latents)",
        "aaaa1111  original          M          0.834 ± 0.008         32 ± 0",
        "cccc2222  original          M_c        0.598 ± 0.006         32",
        "            Δ vs M                     -0.236                +0",
        "eeee3333  retrained         M_c        0.8266 ± 0.0075       30",
        "            Δ vs original              +0.2286 ± 0.0052      +0 ± 0.5°",
        "9999aaaa  pruned:wanda@0.5  M_c        failed: RuntimeError: " + "x" * 38 + "…",
        "",
    ]
    assert max(len(line) for line in text.splitlines()) == WIDTH  # the failed cell's error, cut with …


def test_no_line_over_100_columns_whatever_the_names():
    long_compression = "gptq-w4g64-with-a-very-long-registry-entry-name-that-goes-on-and-on-for-ever-and-ever"
    metrics = {}
    for name in SMOKE_COLUMNS:
        metrics |= with_ci(name, 0.123456, 0.0123456) | with_ci(f"{name}_vs_original", -0.0123456, 0.00123456)
    metrics |= {"saex_kjv_cloze/acc": 0.5, "saex_kjv_ppl/word_perplexity": 123.456}
    results = [row("k" * 24, "original", None, metrics, config={"resolved": {"loaded": None}})]
    for i, source in enumerate(
        ["original", "retrained", "pruned:wanda-with-a-long-name@0.25@seed=12345", "finetuned:100000@seed=1"]
    ):
        results.append(row(f"{i}" * 24, source, long_compression, metrics))
    results.append(row("f" * 24, "retrained", long_compression, {}, status="failed", error="E" * 500))
    results.append(row("r" * 24, "original@seed=1", long_compression, {}, status="running"))
    text = summary("matrix " + "m" * 150, results, OUTPUTS, note="n " * 120)
    lines = text.splitlines()
    assert max(map(len, lines)) <= WIDTH
    assert lines[0] == "matrix " + "m" * 92 + "…"
    assert "pruned:wanda-with-a-long-na…" in text  # a source cut at 28 characters
    assert sum(line.startswith("key ") for line in lines) == 5  # 8 columns in five bands beside a wide source
    assert "saex_kjv_cloze/acc ↑" in text and "saex_kjv_ppl/word_perplexity ↓" in text  # headline gap metrics


def test_next_steps_name_the_commands():
    assert next_steps("smoke", "results/saex.sqlite").splitlines() == [
        "results:     results/saex.sqlite",
        "full report: saex report smoke --full",
        "HTML site:   saex report smoke --out reports/smoke",
        "an SAE:      saex export --key KEY --out DIR",
    ]
