"""Every cell and cache key is built from resolved components (plugin + params with defaults filled in):
a pruner's params are part of a pruned cell's key, a changed plugin default changes the keys, and a
description or registry name does not."""

from __future__ import annotations

import pytest
import yaml
from pydantic import BaseModel, Field

from saex import NoParams, hookimpl
from saex.config.matrix import expand
from saex.config.registry import load_registry
from saex.plugin.manager import load_plugins
from saex.run.sae_artifacts import pruned_sae_key, trained_sae_key


def _registry_data(pruner_params: dict) -> dict:
    return {
        "models": {"tiny": {"plugin": "tiny-llama", "params": {"num_hidden_layers": 2}}},
        "corpora": {"kjv": {"plugin": "kjv"}},
        "compressions": {"mag": {"plugin": "magnitude", "params": {"sparsity": 0.5}}},
        "saes": {"s": {"plugin": "topk", "params": {"expansion_factor": 2, "k": 4}}},
        "pruners": {"lat": {"plugin": "latents", "params": pruner_params}},
        "metrics": {"rec": {"plugin": "reconstruction"}},
        "matrices": {
            "m": {
                "models": ["tiny"],
                "corpus": "kjv",
                "compressions": ["mag"],
                "hooks": ["layers.0.resid_post"],
                "saes": ["s"],
                "sources": ["pruned:lat@0.5"],
                "metrics": ["rec"],
            }
        },
    }


def _keys(tmp_path, data: dict, plugins=None) -> list[str]:
    path = tmp_path / "reg.yaml"
    path.write_text(yaml.safe_dump(data))
    plugins = plugins or load_plugins(entry_points=False)
    registry = load_registry([path], plugins)
    return [c.key(registry) for c in expand("m", registry.matrix("m"))]


def test_a_pruner_param_changes_the_cell_key(tmp_path):
    frequency = _keys(tmp_path, _registry_data({"score": "frequency"}))
    norm = _keys(tmp_path, _registry_data({"score": "decoder_norm_x_activation"}))
    assert len(frequency) == 1 and frequency != norm


def test_a_default_spelled_out_gives_the_same_key(tmp_path):
    assert _keys(tmp_path, _registry_data({})) == _keys(tmp_path, _registry_data({"score": "frequency"}))


def test_a_description_does_not_change_the_key(tmp_path):
    data = _registry_data({})
    described = _registry_data({})
    described["saes"]["s"]["description"] = "a note for readers"
    assert _keys(tmp_path, data) == _keys(tmp_path, described)


def _plugin_with_default(k_default: int):
    class KParams(BaseModel):
        model_config = {"extra": "forbid"}
        k: int = Field(k_default)

    class Shifted:
        name = "shifted"
        description = "a compression whose only param has a default"
        Params = KParams

        def compress(self, model, params, ctx):
            return model

        def expectation(self, model, params):
            raise NotImplementedError

    class Plugin:
        @staticmethod
        @hookimpl
        def register_compressors(register):
            register(Shifted())

    return load_plugins([("shifted", Plugin)], entry_points=False)


def test_a_changed_plugin_default_changes_cell_and_cache_keys(tmp_path):
    data = _registry_data({})
    data["compressions"]["mag"] = {"plugin": "shifted"}
    before, after = _plugin_with_default(1), _plugin_with_default(2)
    assert _keys(tmp_path, data, before) != _keys(tmp_path, data, after)
    path = tmp_path / "reg.yaml"
    reg_before, reg_after = load_registry([path], before), load_registry([path], after)
    assert reg_before.component("compressions", "mag").identity()["params"] == {"k": 1}
    assert reg_after.component("compressions", "mag").identity()["params"] == {"k": 2}


class _Acts:
    """What the key functions read of an activation store: its content-addressed directory name."""

    def __init__(self, name: str):
        self.path = type("P", (), {"name": name})()


@pytest.mark.parametrize("field,value", [("k", 5), ("expansion_factor", 3)])
def test_sae_and_pruned_sae_cache_keys_follow_resolved_params(tmp_path, field, value):
    data = _registry_data({})
    path = tmp_path / "reg.yaml"
    path.write_text(yaml.safe_dump(data))
    plugins = load_plugins(entry_points=False)
    base = load_registry([path], plugins)
    data["saes"]["s"]["params"][field] = value
    path.write_text(yaml.safe_dump(data))
    changed = load_registry([path], plugins)
    acts = _Acts("abc")
    key_base = trained_sae_key(acts, base.component("saes", "s"), seed=0, layer_norm=False)
    key_changed = trained_sae_key(acts, changed.component("saes", "s"), seed=0, layer_norm=False)
    assert key_base != key_changed
    assert trained_sae_key(acts, base.component("saes", "s"), seed=1, layer_norm=False) != key_base
    assert trained_sae_key(acts, base.component("saes", "s"), seed=0, layer_norm=True) != key_base
    pruner = base.component("pruners", "lat")
    assert pruned_sae_key(key_base, pruner, 0.5, acts) != pruned_sae_key(key_base, pruner, 0.25, acts)
    assert isinstance(pruner.params, BaseModel) and not isinstance(pruner.params, NoParams)
