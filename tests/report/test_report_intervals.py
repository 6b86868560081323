"""The report prints a declared interval as ``value ± half-width`` (never as columns of its own) and marks a
paired difference whose interval contains 0, from the declarations alone. Built on hand-made results."""

from __future__ import annotations

import math

from saex.config.matrix import BASE
from saex.plugin.manager import load_plugins
from saex.report.columns import CONTAINS_ZERO_MARK, CONTAINS_ZERO_NOTE, columns, shown
from saex.report.markdown import differences_table, markdown
from saex.run.outputs import declared_outputs
from saex.storage.results import CellResult

OUTPUTS = declared_outputs(load_plugins(entry_points=False))


def result(source: str, metrics: dict[str, float]) -> CellResult:
    cell = {
        "matrix": "m",
        "model": "tiny",
        "compression": None if source == "original" else "wanda-50",
        "hook": "layers.1.resid_post",
        "sae": "topk",
        "source": source,
        "scored_on": BASE if source == "original" else "compressed",
    }
    return CellResult(f"key-{source}", "m", cell, "done", metrics)


RETRAINED = {
    "explained_variance": 0.8,
    "explained_variance_ci_low": 0.77,
    "explained_variance_ci_high": 0.81,
    "explained_variance_vs_original": 0.05,
    "explained_variance_vs_original_ci_low": 0.02,
    "explained_variance_vs_original_ci_high": 0.08,
    "kl_div_score_vs_original": -0.01,
    "kl_div_score_vs_original_ci_low": -0.03,
    "kl_div_score_vs_original_ci_high": 0.02,
}


def test_a_value_with_an_interval_shows_plus_minus_half_its_width():
    assert shown(RETRAINED, "explained_variance", OUTPUTS) == "0.8 ± 0.02"  # (0.81 - 0.77) / 2
    assert shown({"explained_variance": 0.8}, "explained_variance", OUTPUTS) == 0.8  # no interval stored
    ends = {"explained_variance_ci_low": math.nan, "explained_variance_ci_high": 0.9}
    assert shown({"explained_variance": 0.8, **ends}, "explained_variance", OUTPUTS) == 0.8
    assert shown({"l1": 3.0}, "l1", OUTPUTS) == 3.0  # declares no interval


def test_a_paired_difference_is_signed_and_marked_where_its_interval_contains_zero():
    assert shown(RETRAINED, "explained_variance_vs_original", OUTPUTS) == "+0.05 ± 0.03"
    assert shown(RETRAINED, "kl_div_score_vs_original", OUTPUTS) == f"-0.01 ± 0.025{CONTAINS_ZERO_MARK}"


def test_interval_ends_are_never_columns_of_their_own():
    shown_keys = columns([result("retrained", RETRAINED)], OUTPUTS)
    assert shown_keys == ["explained_variance", "explained_variance_vs_original", "kl_div_score_vs_original"]


def test_the_report_has_a_table_of_paired_differences_with_its_footnote():
    results = [result("original", {"explained_variance": 0.75}), result("retrained", RETRAINED)]
    table = differences_table(results, OUTPUTS)
    assert table.splitlines()[0] == (
        "| hook | sae | scored on | source | Δexplained_variance ↑ | Δkl_div_score ↑ | note |"
    )
    assert table.splitlines()[2] == (
        "| layers.1.resid_post | topk | M_c (wanda-50) | retrained | +0.05 ± 0.03 | "
        f"-0.01 ± 0.025{CONTAINS_ZERO_MARK} |  |"
    )
    report = markdown("m", results, OUTPUTS)
    assert "### Paired differences against the original" in report and CONTAINS_ZERO_NOTE in report
    assert report.count(CONTAINS_ZERO_NOTE) == 1
