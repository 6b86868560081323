"""Magnitude pruning, the ``none`` control and the layer-by-layer verification (saex.model.verify)."""

from __future__ import annotations

import numpy as np
import pluggy
import pytest
import torch
import transformers
from pydantic import ValidationError

from saex.model.verify import (
    CompressionMismatch,
    NoTargetsError,
    Targets,
    clone_weights,
    linear_layers,
    verify,
)
from saex.plugin import hookspecs as spec
from saex.plugin.protocols import CompressionContext, CompressionExpectation
from saex.plugins.compression import magnitude as magnitude_module
from saex.plugins.compression import none as none_module
from saex.plugins.compression.magnitude import Magnitude
from saex.plugins.compression.none import NoCompression

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture
def model() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture
def ctx() -> CompressionContext:
    return CompressionContext(
        calibration_tokens=torch.zeros(0, 8, dtype=torch.long), tokenizer=None, device=torch.device("cpu")
    )


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _reference_pruned(w0: torch.Tensor, sparsity: float) -> np.ndarray:
    """Independent reference: stable ascending sort of |w|, the first round(s * numel) entries zeroed."""
    flat = w0.numpy().ravel().copy()
    order = np.argsort(np.abs(flat), kind="stable")
    flat[order[: round(sparsity * flat.size)]] = 0
    return flat.reshape(w0.shape)


def test_default_targets_are_the_fourteen_decoder_linears(model):
    names = list(linear_layers(model))
    assert len(names) == 14
    assert sorted(names) == sorted(
        f"model.layers.{i}.{'self_attn' if p in PROJECTIONS[:4] else 'mlp'}.{p}" for i in range(2) for p in PROJECTIONS
    )


def test_magnitude_reaches_sparsity_in_every_targeted_layer(model, ctx):
    params = Magnitude.Params(sparsity=0.5)
    names = list(linear_layers(model, params.targets))
    assert len(names) == 14
    Magnitude().compress(model, params, ctx)
    for name in names:
        w = model.get_submodule(name).weight
        assert int((w == 0).sum()) == round(0.5 * w.numel()), name
        assert abs((w == 0).float().mean().item() - 0.5) <= 1 / w.numel(), name


def test_magnitude_leaves_embeddings_lm_head_and_norms_bit_equal(model, ctx):
    before = _params(model)
    params = Magnitude.Params(sparsity=0.5)
    pruned = {f"{n}.weight" for n in linear_layers(model, params.targets)}
    Magnitude().compress(model, params, ctx)
    after = _params(model)
    untouched = [n for n in before if n not in pruned]
    assert "model.embed_tokens.weight" in untouched and "lm_head.weight" in untouched
    for name in untouched:
        assert torch.equal(before[name], after[name]), name


def test_magnitude_keeps_exactly_the_largest_weights(model, ctx):
    params = Magnitude.Params(sparsity=0.5)
    originals = clone_weights(model, linear_layers(model, params.targets))
    Magnitude().compress(model, params, ctx)
    for name, w0 in originals.items():
        pruned = model.get_submodule(name).weight.detach().numpy()
        np.testing.assert_array_equal(pruned, _reference_pruned(w0, 0.5), err_msg=name)


def test_magnitude_breaks_ties_deterministically_with_exact_count(model, ctx):
    layer = model.model.layers[0].mlp.down_proj
    with torch.no_grad():  # a coarse grid: thousands of equal magnitudes straddle the threshold
        layer.weight.copy_(torch.round(layer.weight * 20) / 20 + 0.01)
    w0 = layer.weight.detach().clone()
    Magnitude().compress(model, Magnitude.Params(sparsity=0.3), ctx)
    assert int((layer.weight == 0).sum()) == round(0.3 * w0.numel())
    np.testing.assert_array_equal(layer.weight.detach().numpy(), _reference_pruned(w0, 0.3))


def test_none_changes_nothing(model, ctx):
    before = _params(model)
    none = NoCompression()
    out = none.compress(model, none.Params(), ctx)
    assert out is model
    for name, p in out.named_parameters():
        assert torch.equal(before[name], p), name
    assert none.expectation(model, none.Params()) == CompressionExpectation(unchanged=True)
    assert verify(model, linear_layers(model), none.expectation(model, none.Params()))


@pytest.mark.parametrize("bad", [1.5, -0.1, 1.0, float("nan")])
def test_sparsity_out_of_range_is_rejected_naming_the_field(bad):
    with pytest.raises(ValidationError) as err:
        Magnitude.Params(sparsity=bad)
    assert "sparsity" in str(err.value)


def test_unknown_params_and_bad_regex_are_rejected():
    with pytest.raises(ValidationError, match="sparsty"):
        Magnitude.Params(sparsity=0.5, sparsty=0.5)
    with pytest.raises(ValidationError, match="include"):
        Magnitude.Params(sparsity=0.5, targets={"include": ["model.layers.(["]})


def test_targets_select_by_regex(model):
    mlp_only = Targets(include=[r"model\.layers\.\d+\.mlp\..*"], exclude=[r".*down_proj"])
    assert sorted(linear_layers(model, mlp_only)) == sorted(
        f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj")
    )
    with pytest.raises(NoTargetsError, match="no weight matches"):
        linear_layers(model, Targets(include=[r"nothing\..*"]))


def test_verify_passes_after_magnitude_and_reports_every_layer(model, ctx):
    magnitude = Magnitude()
    params = Magnitude.Params(sparsity=0.5)
    names = list(linear_layers(model, params.targets))
    originals = clone_weights(model, names)
    magnitude.compress(model, params, ctx)
    report = verify(model, names, magnitude.expectation(model, params), originals)
    assert [r.name for r in report] == names
    for r in report:
        assert r.n_params == int(np.prod(r.shape))
        assert abs(r.sparsity - 0.5) <= 1 / r.n_params
        assert 0 < r.rel_error < 1


def test_verify_names_the_layer_left_dense(model, ctx):
    magnitude = Magnitude()
    params = Magnitude.Params(sparsity=0.5)
    names = list(linear_layers(model, params.targets))
    originals = clone_weights(model, names)
    magnitude.compress(model, params, ctx)
    dense = "model.layers.1.mlp.down_proj"
    with torch.no_grad():
        model.get_submodule(dense).weight.copy_(originals[dense])
    expectation = magnitude.expectation(model, params)

    with pytest.raises(CompressionMismatch) as err:
        verify(model, names, expectation, originals)
    assert err.value.problems == [f"{dense}: sparsity 0.000, expected 0.500 ± 0.010 (layer stayed dense)"]
    assert dense in str(err.value) and "allow_mismatch=True" in str(err.value)

    report = verify(model, names, expectation, originals, allow_mismatch=True)
    assert len(report) == 14
    left = next(r for r in report if r.name == dense)
    assert left.sparsity == 0.0 and left.rel_error == 0.0


def test_verify_flags_an_unmeasured_target_and_an_untouched_one(model):
    names = list(linear_layers(model))
    originals = clone_weights(model, names)
    expectation = CompressionExpectation(targets=names[:2] + ["model.layers.9.mlp.up_proj"])
    with pytest.raises(CompressionMismatch) as err:
        verify(model, names, expectation, originals)
    assert len(err.value.problems) == 3
    assert "model.layers.9.mlp.up_proj: not in the layer report" in err.value.problems[0]
    assert "bit-equal to the original" in err.value.problems[1]


@pytest.mark.parametrize("module, cls", [(magnitude_module, Magnitude), (none_module, NoCompression)])
def test_registered_through_the_plugin_hook(module, cls):
    pm = pluggy.PluginManager(spec.PROJECT)
    pm.add_hookspecs(spec)
    pm.register(module)
    found = []
    pm.hook.register_compressors(register=found.append)
    assert [type(c) for c in found] == [cls]
