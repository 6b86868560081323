"""The plugin contract checked where it is crossed: what a metric returns (a real number per key; NaN stored as null
with the reason), what ``expectation``, ``build``, ``prune`` and ``load`` return, a misspelt registry key, several
bad entries at once, and a plugin that fails to import. Each runs a real tiny matrix through ``saex.testing``."""

from __future__ import annotations

import sys

import pytest
import torch

from saex import MetricOutput, NoParams, hookimpl
from saex.config.registry import RegistryError
from saex.config.registry_file import RegistryErrors
from saex.plugin.manager import PluginError, load_plugins
from saex.testing import run_tiny

ONE_CELL = {"compressions": ["none"]}


class Returns:
    """A per-SAE metric returning ``value`` under the declared key ``odd``, beside the built-in reconstruction."""

    scope = "sae"
    outputs = (MetricOutput(name="odd", description="what the test returns", aggregation="none"),)
    Params = NoParams

    def __init__(self, name: str, value: object):
        self.name, self.description, self.value = name, f"returns {value!r}", value

    def compute(self, ctx, params):
        return {"odd": self.value}


def metric_plugin(metric: Returns) -> object:
    class Plugin:
        @staticmethod
        @hookimpl
        def register_metrics(register):
            register(metric)

    Plugin.__name__ = metric.name
    return Plugin


def run_with(tmp_path, value: object):
    metric = Returns("returns-odd", value)
    sections = {"metrics": {"odd": {"plugin": "returns-odd"}}}
    rows = run_tiny(
        tmp_path, plugins=[metric_plugin(metric)], sections=sections, metrics=["reconstruction", "odd"], **ONE_CELL
    )
    return next(r for r in rows if r.cell["scored_on"] == "base")


def test_a_metric_returning_nan_is_stored_as_null_with_the_reason(tmp_path):
    row = run_with(tmp_path, float("nan"))
    assert row.status == "done"
    assert row.metrics["odd"] is None and row.details["absent_metrics"]["odd"] == "not a finite number (nan)"
    assert 0 < row.metrics["explained_variance"] <= 1


@pytest.mark.parametrize(
    ("value", "shown"),
    [(torch.tensor([0.5]), "tensor([0.5000]) (Tensor)"), ("0.5", "'0.5' (str)"), (True, "True (bool)")],
)
def test_a_metric_returning_anything_but_a_number_fails_its_cell_naming_metric_key_and_value(tmp_path, value, shown):
    row = run_with(tmp_path, value)
    assert row.status == "failed"
    message = f"metric 'odd' (plugin 'returns-odd') returned 'odd' = {shown}; a metric value must be a float"
    assert message in row.error
    assert "odd" not in row.metrics


def test_a_numpy_float_is_a_number(tmp_path):
    import numpy as np

    row = run_with(tmp_path, np.float32(0.25))
    assert row.status == "done" and row.metrics["odd"] == 0.25


class DictExpectation:
    name = "dict-expectation"
    description = "returns a dict where a CompressionExpectation belongs"
    Params = NoParams

    def expectation(self, model, params):
        return {"targets": ["mlp"]}

    def compress(self, model, params, ctx):
        return model


@hookimpl
def register_compressors(register):
    register(DictExpectation())


def test_an_expectation_that_is_not_a_compression_expectation_fails_naming_plugin_and_protocol(tmp_path):
    sections = {"compressions": {"bad": {"plugin": "dict-expectation"}}}
    rows = run_tiny(tmp_path, plugins=[sys.modules[__name__]], sections=sections, compressions=["bad"])
    failed = [r for r in rows if r.status == "failed"]
    assert len(failed) == 1 and failed[0].cell["compression"] == "bad"
    assert (
        "plugin 'dict-expectation': Compressor.expectation must return a saex CompressionExpectation, got dict"
        in failed[0].error
    )


def test_a_misspelt_key_is_named_as_such_with_the_closest_valid_name(tmp_path):
    sections = {"saes": {"tiny": {"plugin": "topk", "params": {"expansion_factor": 2, "kk": 8}}}}
    with pytest.raises(RegistryError) as raised:
        run_tiny(tmp_path, sections=sections)
    text = str(raised.value)
    assert "saes.tiny.params.kk: unknown key, did you mean 'k'? (got 8)" in text


def test_every_bad_entry_is_reported_together(tmp_path):
    sections = {
        "compressions": {"magnitude-50": {"plugin": "magnitude", "params": {"sparsity": 1.5}}},
        "metrics": {"reconstruction": {"plugin": "no-such-metric"}},
    }
    with pytest.raises(RegistryErrors) as raised:
        run_tiny(tmp_path, sections=sections)
    lines = str(raised.value).splitlines()
    assert lines[0] == "2 problems:"
    assert any("compressions.magnitude-50.params.sparsity" in line and "1.5" in line for line in lines[1:])
    assert any("metrics.reconstruction.plugin: no metric plugin of that name" in line for line in lines[1:])


def test_a_plugin_that_fails_to_import_is_named_with_the_way_round_it(tmp_path, monkeypatch):
    (tmp_path / "broken_plugin.py").write_text("import no_such_module_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError) as raised:
        load_plugins([("broken", "broken_plugin")], entry_points=False)
    assert str(raised.value) == (
        "could not load saex plugin 'broken': ModuleNotFoundError: No module named 'no_such_module_anywhere'; "
        "to run without it, set SAEX_DISABLE_PLUGINS=broken"
    )
