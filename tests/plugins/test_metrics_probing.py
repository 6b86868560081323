"""The concept-level metrics run as ordinary metrics of a matrix: sparse probing and TPP on a labelled CSV, on M
and M_c (with the transfer of M's probes to M_c), the labelled texts collected once per model and hook; a set
whose package is missing is bad input (exit 2) naming the package and its install command."""

from __future__ import annotations

import csv
import random

import pytest

from saex.config.registry import RegistryError
from saex.testing import run_tiny

LETTERS = {"vowels": "aeiou", "digits": "0123456789", "symbols": "+-*/=<>"}


def labelled_csv(path, per_class: int = 30):
    """Texts whose class is plain in every token: strings of vowels, of digits or of symbols."""
    rng = random.Random(0)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for label, alphabet in LETTERS.items():
            for _ in range(per_class):
                words = ["".join(rng.choice(alphabet) for _ in range(rng.randint(2, 6))) for _ in range(6)]
                writer.writerow([" ".join(words), label])
    return path


def sections(tmp_path):
    return {
        "labelled_sets": {
            "chars": {"plugin": "labelled-file", "params": {"path": str(labelled_csv(tmp_path / "c.csv"))}}
        },
        "metrics": {
            "probing": {"plugin": "sparse-probing", "params": {"labelled_sets": ["chars"], "ks": [1, 2]}},
            "tpp": {"plugin": "tpp", "params": {"labelled_sets": ["chars"], "ns": [2, 5]}},
        },
    }


def test_sparse_probing_and_tpp_on_m_and_mc(tmp_path):
    rows = run_tiny(tmp_path, sections=sections(tmp_path), metrics=["reconstruction", "probing", "tpp"])
    assert [r.status for r in rows] == ["done", "done"], [r.error for r in rows]
    on_m, on_mc = sorted(rows, key=lambda r: r.cell["scored_on"])
    for row in rows:
        m = row.metrics
        # the classes are plain in every token: one dimension of the model's pooled activations separates them
        assert m["llm_top_1_test_accuracy"] >= 0.9 and m["llm_test_accuracy"] >= 0.9
        assert 0.5 <= m["sae_top_1_test_accuracy"] <= m["sae_top_2_test_accuracy"] + 0.2
        assert -1 <= m["tpp_threshold_2_total_metric"] <= 1
        total = m["tpp_threshold_5_intended_diff_only"] - m["tpp_threshold_5_unintended_diff_only"]
        assert m["tpp_threshold_5_total_metric"] == pytest.approx(total, abs=1e-12)
        assert set(row.details["sparse_probing"]) == {"chars"}
        for key in ("sae_top_1_test_accuracy", "llm_top_2_test_accuracy"):  # intervals over the test texts
            assert (
                m[f"{key}_ci_low"] <= m[key] <= m[f"{key}_ci_high"] and m[f"{key}_ci_high"] - m[f"{key}_ci_low"] < 0.5
            )
    assert "sae_top_1_transfer_accuracy" not in on_m.metrics
    assert 0 <= on_mc.metrics["sae_top_1_transfer_accuracy"] <= 1
    assert 0 <= on_mc.metrics["llm_top_2_transfer_accuracy"] <= 1


def test_the_texts_are_collected_once_per_model_and_hook(tmp_path):
    """Two metrics read one set on M and M_c: two more activation entries than without them, not four."""
    entries = lambda root: len(list((root / "cache" / "activations").iterdir()))
    run_tiny(tmp_path / "without", metrics=["reconstruction"])
    run_tiny(tmp_path / "with", sections=sections(tmp_path), metrics=["reconstruction", "probing", "tpp"])
    assert entries(tmp_path / "with") == entries(tmp_path / "without") + 2


def test_a_set_whose_package_is_missing_is_bad_input_naming_it(tmp_path):
    extra = {
        "labelled_sets": {"news": {"plugin": "ag-news"}},
        "metrics": {"probing": {"plugin": "sparse-probing", "params": {"labelled_sets": ["news"]}}},
    }
    with pytest.raises(RegistryError) as raised:
        run_tiny(tmp_path, sections=extra, metrics=["reconstruction", "probing"])
    message = str(raised.value)
    assert "metrics.probing.params.labelled_sets[0]: labelled set 'news'" in message
    assert "pip install --no-deps sae-probes==0.4.2 zstandard==0.25.0" in message
    assert not (tmp_path / "cache" / "saes").exists()  # refused before anything was computed


def test_a_metric_naming_an_undefined_set_is_refused_when_the_registry_is_read(tmp_path):
    extra = {"metrics": {"probing": {"plugin": "sparse-probing", "params": {"labelled_sets": ["nowhere"]}}}}
    with pytest.raises(RegistryError) as raised:
        run_tiny(tmp_path, sections=extra, metrics=["reconstruction", "probing"])
    message = str(raised.value)
    assert "metrics.probing.params.labelled_sets[0]: not defined in labelled_sets (got 'nowhere')" in message
    assert not (tmp_path / "cache").exists()  # refused before any model was loaded
