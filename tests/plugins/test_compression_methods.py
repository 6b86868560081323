"""The calibrated and quantizing compression plugins (wanda, sparsegpt, gptq, rtn, hqq) and magnitude N:M:
each keeps its promise in every targeted layer, Wanda/SparseGPT equal a direct llm-compressor call, and bad
parameters are clear errors. Tiny random Llama (2 layers, d 64, byte tokenizer), 8 calibration blocks of 32."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from saex.model.verify import GroupSizeError, Targets, clone_weights, linear_layers, verify
from saex.plugin.manager import load_plugins
from saex.plugin.protocols import CompressionContext, LoadedModel
from saex.plugins.compression.gptq import GPTQ
from saex.plugins.compression.hqq import HQQ
from saex.plugins.compression.llmcompressor_oneshot import (
    CalibrationError,
    bake_quantized_weights,
    linear_selection,
    quantization_modifier,
    run_oneshot,
)
from saex.plugins.compression.magnitude import Magnitude
from saex.plugins.compression.rtn import RTN
from saex.plugins.compression.sparsegpt import SparseGPT
from saex.plugins.compression.wanda import Wanda
from saex.plugins.models.tiny_llama import TinyLlama


@pytest.fixture(scope="module")
def base() -> LoadedModel:
    return TinyLlama().load(TinyLlama.Params(num_hidden_layers=2), torch.device("cpu"))


@pytest.fixture
def model(base):
    return copy.deepcopy(base.model)


@pytest.fixture
def ctx(base) -> CompressionContext:
    tokens = torch.randint(3, 259, (8, 32), generator=torch.Generator().manual_seed(0))
    return CompressionContext(tokens, base.tokenizer, torch.device("cpu"), seed=0)


def compress_and_verify(compressor, model, params, ctx):
    """What the runner does: expectation, originals, compress, verify (raises on a broken promise)."""
    expectation = compressor.expectation(model, params)
    originals = clone_weights(model, expectation.targets)
    model = compressor.compress(model, params, ctx)
    return model, verify(model, expectation.targets, expectation, originals), expectation


# --- pruning ---------------------------------------------------------------------------------------------

PRUNERS = [(Magnitude(), {}), (Wanda(), {}), (SparseGPT(), {})]


@pytest.mark.parametrize("compressor, extra", PRUNERS, ids=lambda c: getattr(c, "name", ""))
@pytest.mark.parametrize("params", [{"sparsity": 0.5}, {"pattern": "2:4"}, {"pattern": "4:8"}], ids=str)
def test_pruners_reach_sparsity_and_pattern_in_every_layer(compressor, extra, params, model, ctx):
    model, report, expectation = compress_and_verify(compressor, model, compressor.Params(**params, **extra), ctx)
    assert len(report) == 14 and [r.name for r in report] == list(linear_layers(model))
    for layer in report:
        assert abs(layer.sparsity - 0.5) <= 0.01, layer.name
        assert layer.n_m_ok is (None if "sparsity" in params else True), layer.name
        assert layer.rel_error > 0 and layer.module_type == "Linear"
    assert expectation.n_m == {"2:4": (2, 4), "4:8": (4, 8)}.get(params.get("pattern"))


@pytest.mark.parametrize("compressor", [Wanda(), SparseGPT()], ids=lambda c: c.name)
def test_calibrated_pruners_reach_an_odd_sparsity(compressor, model, ctx):
    _, report, _ = compress_and_verify(compressor, model, compressor.Params(sparsity=0.3), ctx)
    assert all(abs(r.sparsity - 0.3) <= 1 / 64 for r in report)


def test_magnitude_n_m_keeps_the_largest_of_each_group(model, ctx):
    w0 = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    Magnitude().compress(model, Magnitude.Params(pattern="2:4"), ctx)
    w = model.model.layers[0].mlp.down_proj.weight.detach()
    groups0, groups = w0.reshape(w0.shape[0], -1, 4), w.reshape(w.shape[0], -1, 4)
    kept = groups0.abs().topk(2, dim=2).indices.sort(dim=2).values
    assert torch.equal((groups != 0).nonzero()[:, 2].reshape(kept.shape), kept)
    assert torch.equal(groups.gather(2, kept), groups0.gather(2, kept))  # kept values unchanged


def _llmcompressor_directly(model, ctx, modifier):
    """llm-compressor's own entry point with its own defaults for targets (every Linear), as its docs show."""
    from datasets import Dataset
    from llmcompressor import oneshot

    ids = ctx.calibration_tokens.tolist()
    data = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]})
    torch.manual_seed(ctx.seed)
    oneshot(
        model=model,
        recipe=modifier,
        dataset=data,
        processor=ctx.tokenizer,
        num_calibration_samples=len(ids),
        max_seq_length=len(ids[0]),
        shuffle_calibration_samples=False,
    )
    return model


@pytest.mark.parametrize("pattern, mask_structure", [("unstructured", "0:0"), ("2:4", "2:4")])
@pytest.mark.parametrize("compressor", [Wanda(), SparseGPT()], ids=lambda c: c.name)
def test_calibrated_pruner_masks_match_llmcompressor(compressor, pattern, mask_structure, base, ctx, tmp_path):
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
    from llmcompressor.modifiers.pruning.wanda import WandaPruningModifier

    ours = copy.deepcopy(base.model)
    compressor.compress(
        ours,
        compressor.Params(sparsity=0.5, pattern=pattern)
        if pattern == "unstructured"
        else compressor.Params(pattern=pattern),
        ctx,
    )

    theirs = copy.deepcopy(base.model)
    theirs.config.save_pretrained(tmp_path)
    theirs.config.name_or_path = str(tmp_path)
    cls = WandaPruningModifier if compressor.name == "wanda" else SparseGPTModifier
    _llmcompressor_directly(theirs, ctx, cls(sparsity=0.5, mask_structure=mask_structure, ignore=["re:.*lm_head"]))

    for name in linear_layers(base.model):
        a, b = ours.get_submodule(name).weight, theirs.get_submodule(name).weight
        assert torch.equal(a == 0, b == 0), f"{name}: masks differ"
        assert torch.equal(a, b), f"{name}: kept weights differ"
    assert torch.equal(ours.lm_head.weight, base.model.lm_head.weight)
    assert ours.config.name_or_path == base.model.config.name_or_path  # restored after oneshot


def test_calibrated_pruning_is_reproducible_and_leaves_no_scratch_files(base, ctx, tmp_path):
    first, second = copy.deepcopy(base.model), copy.deepcopy(base.model)
    Wanda().compress(first, Wanda.Params(sparsity=0.5), ctx)
    Wanda().compress(second, Wanda.Params(sparsity=0.5), dataclasses.replace(ctx, workdir=str(tmp_path / "w")))
    for (_, a), (_, b) in zip(first.named_parameters(), second.named_parameters()):
        assert torch.equal(a, b)
    assert list((tmp_path / "w").iterdir()) == []


@pytest.mark.parametrize(
    "compressor, params",
    [(Wanda(), {"sparsity": 0.5}), (SparseGPT(), {"pattern": "2:4"}), (GPTQ(), {"bits": 4}), (RTN(), {"bits": 8})],
    ids=lambda x: str(x),
)
def test_llmcompressor_methods_touch_only_the_selected_layers(compressor, params, model, ctx, base):
    mlp_up = Targets(include=[r"model\.layers\.1\.mlp\.up_proj"])
    _, report, expectation = compress_and_verify(compressor, model, compressor.Params(**params, targets=mlp_up), ctx)
    assert expectation.targets == ["model.layers.1.mlp.up_proj"] and report[0].rel_error > 0
    for name, p in model.named_parameters():
        if name != "model.layers.1.mlp.up_proj.weight":
            assert torch.equal(p, base.model.get_parameter(name)), name


def test_linear_selection_ignores_the_unselected_linears_in_one_pattern(model):
    targets, ignore = linear_selection(model, ["model.layers.0.mlp.up_proj"])
    assert targets == ["Linear"] and ignore[0] == "re:.*lm_head" and len(ignore) == 2
    assert "model\\.layers\\.0\\.mlp\\.down_proj" in ignore[1] and "layers\\.0\\.mlp\\.up_proj|" not in ignore[1]
    assert linear_selection(model, linear_layers(model)) == (["Linear"], ["re:.*lm_head", "re:^(?:lm_head)\\.?$"])


# --- quantization ----------------------------------------------------------------------------------------

QUANTIZERS = [
    (GPTQ(), {"bits": 4}),
    (GPTQ(), {"bits": 8, "group_size": 32}),
    (RTN(), {"bits": 4, "group_size": 16}),
    (RTN(), {"bits": 8, "group_size": None, "activation_bits": 8}),
    (HQQ(), {"nbits": 1}),
    (HQQ(), {"nbits": 2}),
    (HQQ(), {"nbits": 3, "group_size": 32}),
    (HQQ(), {"nbits": 4}),
    (HQQ(), {"nbits": 8}),
    (HQQ(), {"nbits": 4, "axis": 0, "group_size": 32}),
]


@pytest.mark.parametrize("compressor, params", QUANTIZERS, ids=lambda x: getattr(x, "name", None) or str(x))
def test_quantizers_stay_within_two_to_the_bits_values_per_group(compressor, params, model, ctx):
    model, report, expectation = compress_and_verify(compressor, model, compressor.Params(**params), ctx)
    bits = expectation.bits
    assert bits == params.get("bits", params.get("nbits")) and len(report) == 14
    for layer in report:
        assert layer.max_distinct_per_group <= 2**bits, layer.name
        group = expectation.group_size or layer.shape[1]  # a group cannot hold more values than it has weights
        assert layer.max_distinct_per_group > min(2 ** (bits - 1), group // 2), f"{layer.name}: grid too coarse"
        assert 0 < layer.rel_error < (1.5 if bits == 1 else 1)
    with torch.no_grad():
        assert torch.isfinite(model(ctx.calibration_tokens[:2]).logits).all()


@pytest.mark.parametrize("compressor", [GPTQ(), RTN()], ids=lambda c: c.name)
def test_llmcompressor_quantizers_leave_plain_linear_modules(compressor, model, ctx):
    compressor.compress(model, compressor.Params(bits=4), ctx)
    for name, layer in linear_layers(model).items():
        assert type(layer) is nn.Linear and "forward" not in vars(layer), name
        assert [n for n, _ in layer.named_parameters()] == ["weight"], name
        assert not hasattr(layer, "quantization_scheme")


def test_baked_weights_give_bit_identical_logits(model, ctx):
    from llmcompressor.modifiers.quantization import QuantizationModifier

    names = list(linear_layers(model))
    run_oneshot(model, quantization_modifier(QuantizationModifier, model, RTN.Params(bits=4, group_size=16)), ctx)
    tokens = ctx.calibration_tokens[:2]
    with torch.no_grad():
        fake_quantized = model(tokens).logits
        assert bake_quantized_weights(model) == names
        baked = model(tokens).logits
    assert torch.equal(fake_quantized, baked)


def test_w8a8_keeps_quantizing_activations(model, ctx):
    RTN().compress(model, RTN.Params(bits=8, group_size=None, activation_bits=8), ctx)
    layer = model.model.layers[0].mlp.up_proj
    assert layer.quantization_scheme.weights is None  # baked into the weight
    assert layer.quantization_scheme.input_activations.num_bits == 8


def test_hqq_replaces_targets_with_hqqlinear_and_leaves_the_rest(model, ctx, base):
    from hqq.core.quantize import HQQLinear

    names = list(linear_layers(model))
    HQQ().compress(model, HQQ.Params(nbits=4), ctx)
    assert all(isinstance(model.get_submodule(n), HQQLinear) for n in names)
    assert type(model.lm_head) is nn.Linear and torch.equal(model.lm_head.weight, base.model.lm_head.weight)
    assert torch.equal(model.model.embed_tokens.weight, base.model.model.embed_tokens.weight)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_hqq_on_cuda(base):
    model = copy.deepcopy(base.model).cuda()
    ctx = CompressionContext(torch.zeros(0, 8, dtype=torch.long), None, torch.device("cuda"))
    _, report, _ = compress_and_verify(HQQ(), model, HQQ.Params(nbits=4), ctx)
    assert all(r.max_distinct_per_group <= 16 for r in report)


# --- errors ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls, raw, field",
    [
        (Wanda, {"sparsity": 1.5}, "sparsity"),
        (SparseGPT, {"sparsity": -0.1}, "sparsity"),
        (Magnitude, {"pattern": "4:2"}, "pattern"),
        (Magnitude, {"pattern": "2of4"}, "pattern"),
        (Wanda, {}, "sparsity is required"),
        (Wanda, {"sparsity": 0.3, "pattern": "2:4"}, "contradicts pattern '2:4'"),
        (HQQ, {"nbits": 5}, "nbits"),
        (HQQ, {"group_size": 12}, "multiple of 8"),
        (GPTQ, {"bits": 5}, "bits"),
        (RTN, {"group_size": 0}, "group_size"),
        (RTN, {"bits": 4, "scheme": "W4A16"}, "scheme"),
    ],
)
def test_bad_params_are_rejected_naming_the_field(cls, raw, field):
    with pytest.raises(ValidationError, match=field):
        cls.Params(**raw)


@pytest.mark.parametrize(
    "compressor, params",
    [
        (GPTQ(), GPTQ.Params(group_size=48)),
        (RTN(), RTN.Params(group_size=48)),
        (HQQ(), HQQ.Params(group_size=48)),
        (HQQ(), HQQ.Params(group_size=48, axis=0)),
    ],
    ids=["gptq", "rtn", "hqq", "hqq-axis0"],
)
def test_group_size_not_dividing_a_layer_names_the_layer(compressor, params, model, ctx):
    with pytest.raises(
        GroupSizeError,
        match=r"group_size 48 does not divide the (input|output) width 64 of "
        r"layer model\.layers\.0\.self_attn\.q_proj",
    ) as err:
        compressor.expectation(model, params)
    assert "group sizes that fit" in str(err.value)
    with pytest.raises(GroupSizeError):
        compressor.compress(model, params, ctx)


def test_n_m_not_dividing_a_layer_names_the_layer(model):
    with pytest.raises(ValueError, match="M=5 does not divide the input width 64 of layer model.layers.0"):
        Magnitude().expectation(model, Magnitude.Params(pattern="2:5"))


def test_llmcompressor_methods_need_calibration_tokens(model, base):
    empty = CompressionContext(torch.zeros(0, 8, dtype=torch.long), base.tokenizer, torch.device("cpu"))
    with pytest.raises(CalibrationError, match="calibration token blocks"):
        Wanda().compress(model, Wanda.Params(sparsity=0.5), empty)


def test_every_method_is_a_registered_builtin():
    names = load_plugins(entry_points=False).names("compression")
    assert {"none", "magnitude", "wanda", "sparsegpt", "gptq", "rtn", "hqq"} <= set(names)
