"""A model family saex has no layout for becomes one plugin file (tests/fixtures/saex_olmo2_plugin.py): without
it OLMo-2 is refused by name; with it, its hook points hold what its blocks add and a whole matrix runs on it. A
plugin cannot replace a built-in layout, and two plugins cannot register one model type."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from saex import Layout, hookimpl
from saex.model.hookpoints import HOOK_SITES, HookPoint, capture
from saex.model.layouts import UnsupportedModelError, attach_layout, layout_of
from saex.plugin.manager import PluginError, load_plugins
from saex.plugins.models.tiny_llama import byte_tokenizer
from saex.testing import run_tiny

FIXTURE = Path(__file__).parents[1] / "fixtures" / "saex_olmo2_plugin.py"


@pytest.fixture(scope="module")
def olmo2():
    spec = importlib.util.spec_from_file_location("saex_olmo2_plugin", FIXTURE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def plugin(olmo2, tmp_path):
    byte_tokenizer().save_pretrained(tmp_path / "tokenizer")
    return olmo2.plugin(str(tmp_path / "tokenizer"))


def test_olmo2_without_the_plugin_is_refused_by_name(plugin):
    assert "tiny-olmo2" not in load_plugins(entry_points=False).names("model")
    source = load_plugins([("olmo2", plugin)], entry_points=False).get("model", "tiny-olmo2")
    bare = source.load(source.Params(), torch.device("cpu")).model  # loaded, no layout attached
    with pytest.raises(UnsupportedModelError, match=r"model_type 'olmo2'\) has no hook layout"):
        layout_of(bare)


def test_with_the_plugin_attn_out_plus_mlp_out_is_what_each_block_adds(plugin, olmo2):
    plugins = load_plugins([("olmo2", plugin)], entry_points=False)
    assert plugins.layouts == {"olmo2": ("olmo2", olmo2.OLMO2)}
    source = plugins.get("model", "tiny-olmo2")
    model = source.load(source.Params(), torch.device("cpu")).model
    attach_layout(model, plugins.layouts)
    ids = torch.randint(3, 259, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    got = capture(model, ids, [HookPoint(layer, s) for layer in range(2) for s in HOOK_SITES], stop_early=False)
    pre, post = got[HookPoint(0, "resid_pre")], got[HookPoint(0, "resid_post")]
    assert torch.equal(pre, hidden[0]) and torch.equal(post, hidden[1])
    added = got[HookPoint(0, "attn_out")] + got[HookPoint(0, "mlp_out")]
    assert ((added - (post - pre)).abs().max() / post.abs().max()).item() < 1e-6


def test_a_whole_matrix_runs_on_the_plugins_architecture(plugin, tmp_path):
    sections = {"models": {"olmo": {"plugin": "tiny-olmo2"}}}
    rows = run_tiny(tmp_path, plugins=[plugin], sections=sections, models=["olmo"])
    assert [r.status for r in rows] == ["done", "done"], [r.error for r in rows]
    assert all(0 < r.metrics["explained_variance"] <= 1 for r in rows)


def test_a_plugin_cannot_replace_a_built_in_layout(tiny_llama):
    class Override:
        @staticmethod
        @hookimpl
        def register_layouts(register):
            register("llama", Layout(blocks="model.layers", attn_out="self_attn", mlp_out="mlp"))

    plugins = load_plugins([("override", Override)], entry_points=False)
    with pytest.raises(UnsupportedModelError, match="plugin 'override' registers a layout for model_type 'llama'"):
        attach_layout(tiny_llama.model, plugins.layouts)


def test_two_plugins_registering_one_model_type_are_both_named(olmo2):
    def registering(name):
        class Registers:
            @staticmethod
            @hookimpl
            def register_layouts(register):
                register("olmo2", olmo2.OLMO2)

        return (name, Registers)

    with pytest.raises(PluginError, match="layout 'olmo2' is registered by both plugin 'first' and 'second'"):
        load_plugins([registering("first"), registering("second")], entry_points=False)
