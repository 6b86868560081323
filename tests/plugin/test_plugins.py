"""Plugin loading: built-ins, a third-party distribution found through the `saex` entry-point group, the
allow/block env vars, and a fresh manager per call."""

import json
from pathlib import Path

import pytest
import torch

from saex import SAE, NoParams, SAEParams, hookimpl
from saex.cli import main
from saex.plugin.manager import PluginError, builtin_plugins, load_plugins
from saex.plugins.sae.relu import ReLUSAE
from saex.sae.base import load_sae, save_sae

FIXTURES = Path(__file__).parents[1] / "fixtures"


@pytest.fixture
def third_party(install_distribution):
    """A throwaway distribution `saex-scale` with one entry point in the `saex` group."""
    return install_distribution(FIXTURES / "saex_scale_plugin.py", "saex-scale", "scale")


def test_every_builtin_registers_something():
    plugins = load_plugins(entry_points=False)
    registered_by = {r.plugin for table in plugins.components.values() for r in table.values()}
    assert registered_by == {m.removeprefix("saex.plugins.") for m in builtin_plugins()}
    assert "pruning.common" not in registered_by  # a helper module without hookimpls is not a plugin
    assert all(r.source == "built-in" for table in plugins.components.values() for r in table.values())


def test_entry_point_plugin_is_discovered(third_party):
    plugins = load_plugins()
    registered = plugins.components["compression"]["scale"]
    assert registered.source == "saex-scale==0.1" and registered.plugin == "scale"


def test_managers_do_not_leak_between_loads(third_party):
    assert "scale" in load_plugins().names("compression")
    assert "scale" not in load_plugins(entry_points=False).names("compression")


def test_allow_list_and_block_list(monkeypatch):
    monkeypatch.setenv("SAEX_DISABLE_PLUGINS", "compression.magnitude")
    plugins = load_plugins(entry_points=False)
    assert "magnitude" not in plugins.names("compression") and "magnitude" in plugins.names("pruner")
    monkeypatch.delenv("SAEX_DISABLE_PLUGINS")
    monkeypatch.setenv("SAEX_PLUGINS", "compression.none,sae.topk")
    plugins = load_plugins(entry_points=False)
    assert plugins.names("compression") == ["none"] and plugins.names("sae") == ["topk"]
    assert plugins.names("metric") == []


def test_duplicate_component_name_is_an_error():
    class Twin:
        from saex.plugin.hookspecs import hookimpl

        @staticmethod
        @hookimpl
        def register_compressors(register):
            from saex.plugins.compression.none import NoCompression

            register(NoCompression())

    with pytest.raises(PluginError, match="registered by both plugin 'compression.none' and 'twin'"):
        load_plugins([("twin", Twin)], entry_points=False)


def test_plugins_command_lists_kind_name_source_params(third_party, capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "compression  scale" in out and "saex-scale==0.1" in out and "factor: number = 0.5" in out
    assert "sae          topk" in out and "k: integer = 32" in out


# --- components checked against their kind's Protocol at registration --------------------------------------


def plugin_registering(hook: str, component: object) -> type:
    """A plugin object whose ``hook`` registers ``component``."""

    def register_it(register):
        register(component)

    return type("Plugin", (), {hook: staticmethod(hookimpl(register_it, specname=hook))})


class Unnamed(SAE):
    description = "no name"
    Params = SAEParams


class NumberName(Unnamed):
    name = 3


class NoParamsModel(SAE):
    name = "no-params"
    description = "no Params"


class DictParams(NoParamsModel):
    Params = dict


@pytest.mark.parametrize(
    ("architecture", "problem"),
    [
        (Unnamed, "attribute 'name' is missing"),
        (NumberName, "attribute 'name' must be a str, got 3"),
        (NoParamsModel, "attribute 'Params' is missing"),
        (DictParams, "attribute 'Params' must be a subclass of BaseModel, got <class 'dict'>"),
    ],
)
def test_misdeclared_architecture_is_refused_at_registration(architecture: type, problem: str):
    plugin = plugin_registering("register_sae_architectures", architecture)
    with pytest.raises(PluginError) as raised:
        load_plugins([("bad", plugin)], entry_points=False)
    message = str(raised.value)
    assert message.startswith("plugin 'bad' registered sae ") and "does not satisfy SAEArchitecture" in message
    assert architecture.__name__ in message and message.endswith(problem)


class Doubled(ReLUSAE):
    """A third-party architecture: only its class attributes differ from ReLU."""

    name = "doubled"
    description = "a ReLU SAE under another name"


def test_architecture_saved_under_its_name_loads_back_through_the_registry(tmp_path):
    plugins = load_plugins([("doubled", plugin_registering("register_sae_architectures", Doubled))], entry_points=False)
    arch = plugins.get("sae", "doubled")
    sae = arch.build(8, arch.Params(d_sae=16), seed=1)
    save_sae(sae, tmp_path)
    assert json.loads((tmp_path / "cfg.json").read_text())["architecture"] == "doubled"
    back = load_sae(tmp_path, {name: plugins.get("sae", name) for name in plugins.names("sae")})
    assert type(back) is Doubled and torch.equal(back.W_enc, sae.W_enc)


class SpliceOnly:
    name = "splice-only"
    description = "a splice metric"
    Params = NoParams
    scope = "splice"
    outputs = ()

    def compute_spliced(self, ctx, params):
        return {}


class SaeScopeWithoutCompute(SpliceOnly):
    name = "no-compute"
    scope = "sae"


def test_a_metric_needs_only_the_method_its_scope_selects():
    plugin = plugin_registering("register_metrics", SpliceOnly())
    assert "splice-only" in load_plugins([("ok", plugin)], entry_points=False).names("metric")
    plugin = plugin_registering("register_metrics", SaeScopeWithoutCompute())
    with pytest.raises(PluginError, match=r"plugin 'bad' registered metric .*method 'compute' is missing$"):
        load_plugins([("bad", plugin)], entry_points=False)


def test_a_metric_scope_outside_its_literal_is_refused():
    bad = SpliceOnly()
    bad.scope = "model"
    with pytest.raises(PluginError, match=r"attribute 'scope' must be one of 'sae', 'splice', got 'model'"):
        load_plugins([("bad", plugin_registering("register_metrics", bad))], entry_points=False)
