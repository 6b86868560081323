"""Compression on every layout, through the spine's ``compress_verified``: the default targets are every
block's attention and MLP weights (fused ones, GPT-2's Conv1D made Linear, MoE experts), the per-layer report
counts every block weight, embeddings and LM head stay untouched; Linear-only methods refuse MoE experts."""

from __future__ import annotations

from functools import cache

import pytest
import torch
from pydantic import BaseModel
from torch import nn

from saex.model.compressed import Compressed, compress_verified
from saex.model.layouts import layout_of
from saex.model.linearize import conv1d_to_linear
from saex.model.verify import NotLinearError, block_weight_names
from saex.plugin.protocols import CompressionContext, Compressor
from saex.plugins.compression.gptq import GPTQ
from saex.plugins.compression.hqq import HQQ
from saex.plugins.compression.magnitude import Magnitude
from saex.plugins.compression.rtn import RTN
from saex.plugins.compression.sparsegpt import SparseGPT
from saex.plugins.compression.wanda import Wanda
from saex.plugins.models.tiny import Architecture, TinyParams, tiny_model
from saex.plugins.models.tiny_llama import byte_tokenizer
from saex.storage.cache import Cache

pytestmark = pytest.mark.usefixtures("single_thread")

ARCHITECTURES: tuple[str, ...] = Architecture.__args__
# weight matrices per block: fused qkv / gate_up count once; an MoE block has q, k, v, o, its router and two
# 3-D expert weights; OPT's MLP is fc1 / fc2 on the block
WEIGHTS_PER_BLOCK = {"phi3": 4, "gpt2": 4, "gpt_neox": 4, "falcon": 4, "bloom": 4, "opt": 6}
ROUTERS = {"mixtral": "MixtralTopKRouter", "qwen3_moe": "Qwen3MoeTopKRouter"}


@cache
def base(architecture: str) -> nn.Module:
    return tiny_model(TinyParams(architecture=architecture, num_hidden_layers=2))


@pytest.fixture(scope="module")
def ctx() -> CompressionContext:
    tokens = torch.randint(3, 259, (8, 32), generator=torch.Generator().manual_seed(0))
    return CompressionContext(tokens, byte_tokenizer(), torch.device("cpu"), seed=0)


def compress(tmp_path, architecture: str, compressor: Compressor, params: BaseModel, ctx) -> Compressed:
    return compress_verified(
        Cache(tmp_path / "cache"),
        base(architecture),
        {"tiny": architecture},
        compressor.name,
        compressor,
        params,
        ctx,
        "",
    )


def outside_blocks_unchanged(architecture: str, compressed: nn.Module) -> bool:
    """Embeddings, final norm, LM head (and Gemma-3's vision tower) are bit-equal to the base model's."""
    blocks = layout_of(compressed).blocks + "."
    original = dict(base(architecture).named_parameters())
    outside = [(n, p) for n, p in compressed.named_parameters() if not n.startswith(blocks)]
    return len(outside) > 0 and all(torch.equal(p, original[n]) for n, p in outside)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_magnitude_prunes_half_of_every_block_weight(architecture, tmp_path, ctx) -> None:
    result = compress(tmp_path, architecture, Magnitude(), Magnitude.Params(sparsity=0.5), ctx)
    layers = result.details["layers"]
    assert [layer["name"] for layer in layers] == block_weight_names(result.model)
    assert len(layers) == 2 * WEIGHTS_PER_BLOCK.get(architecture, 7)
    router = ROUTERS.get(architecture)
    for layer in layers:
        expected = 0.0 if layer["module_type"] == router else 0.5
        assert layer["sparsity"] == pytest.approx(expected, abs=1e-9), layer["name"]
    zeros = sum(layer["sparsity"] * layer["n_params"] for layer in layers)
    share = zeros / sum(layer["n_params"] for layer in layers)
    assert share == pytest.approx(0.5, abs=0.01 if router else 1e-9)
    assert outside_blocks_unchanged(architecture, result.model)


@pytest.mark.parametrize("architecture", sorted(ROUTERS))
def test_magnitude_prunes_each_expert_as_its_own_matrix(architecture, tmp_path, ctx) -> None:
    model = compress(tmp_path, architecture, Magnitude(), Magnitude.Params(pattern="2:4"), ctx).model
    layers = model.model.layers
    experts = layers[1].mlp.experts
    for weight in (experts.gate_up_proj, experts.down_proj):
        for matrix in weight:
            assert (matrix == 0).sum().item() == matrix.numel() // 2
            assert ((matrix.reshape(matrix.shape[0], -1, 4) != 0).sum(-1) <= 2).all()


def test_gpt2_conv1d_becomes_an_equal_linear() -> None:
    from transformers.pytorch_utils import Conv1D

    model = base("gpt2")
    ids = torch.randint(3, 259, (2, 16), generator=torch.Generator().manual_seed(0))
    converted = conv1d_to_linear(tiny_model(TinyParams(architecture="gpt2", num_hidden_layers=2)))
    assert block_weight_names(converted) == block_weight_names(model)
    assert not any(isinstance(m, Conv1D) for m in converted.modules())
    assert converted.transformer.h[0].attn.c_attn.weight.shape == (96, 32)  # [out, in], qkv fused
    with torch.no_grad():
        assert torch.equal(converted(input_ids=ids).logits, model(input_ids=ids).logits)


def test_magnitude_refuses_an_unconverted_conv1d(ctx) -> None:
    """Called outside the spine, which converts first: [in, out] would put N:M groups on the wrong axis."""
    with pytest.raises(NotLinearError, match=r"transformer\.h\.0\.attn\.c_attn is a Conv1D.*conv1d_to_linear"):
        Magnitude().compress(
            tiny_model(TinyParams(architecture="gpt2", num_hidden_layers=1)), Magnitude.Params(pattern="2:4"), ctx
        )


def test_compressed_gpt2_reloads_from_the_cache(tmp_path, ctx) -> None:
    params = Magnitude.Params(pattern="2:4")
    first = compress(tmp_path, "gpt2", Magnitude(), params, ctx)
    again = compress(tmp_path, "gpt2", Magnitude(), params, ctx)
    assert not first.details["from_cache"] and again.details["from_cache"]
    assert all(layer["n_m_ok"] and layer["module_type"] == "Linear" for layer in first.details["layers"])
    for (name, p), q in zip(first.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.equal(p, q), name


LINEAR_ONLY = [
    ("gpt2", Wanda(), {"sparsity": 0.5}),
    ("opt", SparseGPT(), {"pattern": "2:4"}),
    ("gpt2", GPTQ(), {"bits": 4, "group_size": 16}),
    ("gemma2", GPTQ(), {"bits": 4, "group_size": 16}),
    ("falcon", RTN(), {"bits": 8, "group_size": None}),
    ("bloom", HQQ(), {"nbits": 4, "group_size": 16}),
]


@pytest.mark.parametrize(
    "architecture, compressor, params", LINEAR_ONLY, ids=[f"{a}-{c.name}" for a, c, _ in LINEAR_ONLY]
)
def test_linear_methods_compress_every_block_weight(architecture, compressor, params, tmp_path, ctx) -> None:
    result = compress(tmp_path, architecture, compressor, compressor.Params(**params), ctx)  # verified inside
    layers = result.details["layers"]
    assert len(layers) == 2 * WEIGHTS_PER_BLOCK.get(architecture, 7)
    assert all(layer["rel_error"] > 0 for layer in layers)
    assert outside_blocks_unchanged(architecture, result.model)


@pytest.mark.parametrize(
    "compressor, params",
    [
        (Wanda(), {"sparsity": 0.5}),
        (SparseGPT(), {"sparsity": 0.5}),
        (GPTQ(), {"group_size": 16}),
        (RTN(), {"group_size": 16}),
        (HQQ(), {"group_size": 16}),
    ],
    ids=lambda c: getattr(c, "name", ""),
)
def test_linear_only_methods_refuse_moe_experts_before_compressing(compressor, params, tmp_path, ctx) -> None:
    """Refused by the promise, which the spine asks for before compressing: never a partial result."""
    with pytest.raises(NotLinearError) as err:
        compressor.expectation(base("mixtral"), compressor.Params(**params))
    message = str(err.value)
    assert "model.layers.0.mlp.experts.gate_up_proj (a 3-D parameter of MixtralExperts)" in message
    assert "magnitude" in message and "targets.exclude" in message
    with pytest.raises(NotLinearError):
        compress(tmp_path, "mixtral", compressor, compressor.Params(**params), ctx)
