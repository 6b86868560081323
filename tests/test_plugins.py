"""Plugin loading: built-ins, a third-party distribution found through the `saex` entry-point group, the
allow/block env vars, and a fresh manager per call."""

from pathlib import Path

import pytest

from saex.cli import main
from saex.manager import PluginError, builtin_plugins, load_plugins

FIXTURES = Path(__file__).parent / "fixtures"


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
        from saex.spec import hookimpl

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
