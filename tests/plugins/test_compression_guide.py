"""The worked example of docs/COMPRESSION.md (tests/fixtures/saex_ternary_plugin.py), installed as a throwaway
distribution and found through the `saex` entry-point group, then run and verified exactly as the runner does."""

from pathlib import Path

import pytest
import torch

from saex.model.verify import clone_weights, verify
from saex.plugin.manager import load_plugins
from saex.plugin.protocols import CompressionContext
from saex.plugins.models.tiny_llama import TinyLlama

FIXTURES = Path(__file__).parents[1] / "fixtures"
GUIDE = Path(__file__).parents[2] / "docs" / "COMPRESSION.md"


@pytest.fixture
def ternary_dist(install_distribution):
    return install_distribution(FIXTURES / "saex_ternary_plugin.py", "saex-ternary", "ternary")


def test_worked_example_is_discovered_compresses_and_verifies(ternary_dist):
    plugins = load_plugins()
    registered = plugins.components["compression"]["ternary"]
    assert registered.source == "saex-ternary==0.1"
    ternary = registered.component
    model = TinyLlama().load(TinyLlama.Params(num_hidden_layers=2), torch.device("cpu")).model
    params = ternary.Params.model_validate({"threshold": 0.5})
    expectation = ternary.expectation(model, params)
    originals = clone_weights(model, expectation.targets)
    ctx = CompressionContext(torch.zeros(0, 8, dtype=torch.long), None, torch.device("cpu"))
    model = ternary.compress(model, params, ctx)
    report = verify(model, expectation.targets, expectation, originals)
    assert len(report) == 14
    assert all(r.max_distinct_per_group == 3 and 0 < r.rel_error < 1 for r in report)


def test_guide_shows_the_fixture_verbatim():
    """The guide's code block is the fixture file, so the documented example is the tested one."""
    assert (FIXTURES / "saex_ternary_plugin.py").read_text().strip() in GUIDE.read_text()
