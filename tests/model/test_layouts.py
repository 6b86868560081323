"""Hook points and the splice on every supported layout, on tiny random models (3 blocks, d 32, windows of 4
tokens in 16-token blocks): resid_pre / resid_post are HF's hidden states, attn_out + mlp_out is what the block
adds, parallel layouts feed the MLP resid_pre, and the suffix pass from any hook gives the model's own logits
without running the earlier blocks. Unsupported models and configurations are refused by name."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

import pytest
import torch
from torch import nn

from saex.model.hookpoints import HOOK_SITES, HookPoint, capture, check_hook, spliced
from saex.model.layouts import LAYOUTS, UnsupportedModelError, decoder_layers, layout_of
from saex.model.splice import prefix, suffix_logits
from saex.plugins.models.tiny import Architecture, TinyParams, tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")

ARCHITECTURES: tuple[str, ...] = Architecture.__args__
N_LAYERS = 3
# where HF applies the final norm, which it folds into the last hidden state (resid_post of the last block is
# the raw residual, as TransformerLens's)
FINAL_NORM = {
    "gemma3": "model.language_model.norm",
    "gpt2": "transformer.ln_f",
    "falcon": "transformer.ln_f",
    "bloom": "transformer.ln_f",
    "gpt_neox": "gpt_neox.final_layer_norm",
    "opt": "model.decoder.final_layer_norm",
}
PARALLEL = {"gpt_neox", "falcon"}  # attention and MLP both read resid_pre (the tiny configs' defaults)


@cache
def model_of(architecture: str) -> nn.Module:
    """Shared across tests: tests leave no hooks and change no weights."""
    return tiny_model(TinyParams(architecture=architecture, num_hidden_layers=N_LAYERS))


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(3, 259, (2, 16), generator=torch.Generator().manual_seed(0))


def rel_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).abs().max() / expected.abs().max()).item()


def test_every_layout_is_covered() -> None:
    assert set(ARCHITECTURES) == set(LAYOUTS)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_resid_sites_are_hf_hidden_states_and_attn_plus_mlp_is_the_block_update(architecture, ids) -> None:
    model = model_of(architecture)
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    assert len(hidden) == N_LAYERS + 1
    got = capture(model, ids, [HookPoint(layer, s) for layer in range(N_LAYERS) for s in HOOK_SITES], stop_early=False)
    for layer in range(N_LAYERS):
        pre, post = got[HookPoint(layer, "resid_pre")], got[HookPoint(layer, "resid_post")]
        assert pre.shape == (2, 16, 32)
        assert torch.equal(pre, hidden[layer])
        if layer < N_LAYERS - 1:
            assert torch.equal(post, hidden[layer + 1])
        added = got[HookPoint(layer, "attn_out")] + got[HookPoint(layer, "mlp_out")]
        # float32 rounding of the residual adds, at the scale of the residual stream
        assert ((added - (post - pre)).abs().max() / post.abs().max()).item() < 1e-6, layer
    norm = model.get_submodule(FINAL_NORM.get(architecture, "model.norm"))
    with torch.no_grad():
        assert torch.equal(norm(got[HookPoint(N_LAYERS - 1, "resid_post")]), hidden[N_LAYERS])


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_mlp_reads_resid_pre_exactly_on_parallel_layouts(architecture, ids) -> None:
    model, hook = model_of(architecture), HookPoint(1, "mlp_out")
    clean = capture(model, ids, [hook])[hook]
    with spliced(model, HookPoint(1, "attn_out"), torch.zeros_like):
        ablated = capture(model, ids, [hook])[hook]
    assert torch.equal(ablated, clean) is (architecture in PARALLEL)


@contextmanager
def block_calls(model: nn.Module) -> Iterator[list[int]]:
    """Forward calls finished per block (a counter on the real block modules)."""
    calls = [0] * N_LAYERS
    handles = [
        block.register_forward_hook(lambda m, a, out, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, block in enumerate(decoder_layers(model))
    ]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def roll(x: torch.Tensor) -> torch.Tensor:
    """A splice no final norm undoes (unlike a scale, under RMSNorm / LayerNorm)."""
    return x.roll(1, dims=-1)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_suffix_gives_the_models_own_logits_without_rerunning_earlier_blocks(architecture, ids) -> None:
    model = model_of(architecture)
    mask = torch.rand(2, 16, generator=torch.Generator().manual_seed(1)) < 0.7
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
    blocks = list(decoder_layers(model))
    for layer in range(N_LAYERS):
        for site in HOOK_SITES:
            hook = HookPoint(layer, site)
            hidden = prefix(model, ids, hook)
            with block_calls(model) as calls:
                clean = suffix_logits(model, hidden, hook, None, None)
            assert calls == [0] * layer + [1] * (N_LAYERS - layer), hook
            assert rel_error(clean, full) <= 1e-5, hook
            with torch.no_grad(), spliced(model, hook, roll, mask):
                full_spliced = model(input_ids=ids, use_cache=False).logits
            assert rel_error(suffix_logits(model, hidden, hook, roll, mask), full_spliced) <= 1e-5
            assert rel_error(full_spliced, full) > 1e-3, hook  # the splice did something
    assert list(decoder_layers(model)) == blocks  # every block is back in place


@pytest.mark.parametrize("architecture", ["gemma2", "gemma3_text", "gemma3", "qwen2"])
def test_block_is_longer_than_the_window_and_layer_types_mix(architecture, ids) -> None:
    """What makes the suffix identity above a test of per-layer attention types (and Gemma-3's local/global
    RoPE): each layer's type, read by its index, changes the logits at this block size."""
    model = model_of(architecture)
    config = model.config.get_text_config()
    assert len(set(config.layer_types)) == 2 and config.sliding_window < ids.shape[1]
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
        types = list(config.layer_types)
        config.layer_types = types[1:] + types[:1]
        try:
            shifted = model(input_ids=ids, use_cache=False).logits
        finally:
            config.layer_types = types
    assert rel_error(shifted, full) > 1e-3


def test_gemma3_local_and_global_rope_differ() -> None:
    rope = model_of("gemma3_text").config.rope_parameters
    assert rope["sliding_attention"]["rope_theta"] != rope["full_attention"]["rope_theta"]


def test_unsupported_model_is_named_with_the_supported_ones() -> None:
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    config = GPTNeoConfig(vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, attention_types=[[["global"], 2]])
    model = GPTNeoForCausalLM(config)
    with pytest.raises(UnsupportedModelError) as err:
        check_hook(model, HookPoint(0, "resid_post"))
    assert isinstance(err.value, ValueError)
    message = str(err.value)
    assert "GPTNeoForCausalLM (model_type 'gpt_neo') has no hook layout" in message
    assert all(model_type in message for model_type in LAYOUTS)


@pytest.mark.parametrize(
    "architecture, attribute, value",
    [
        ("opt", "do_layer_norm_before", False),
        ("bloom", "apply_residual_connection_post_layernorm", True),
        ("bloom", "slow_but_exact", True),
    ],
)
def test_configurations_whose_sites_are_not_additive_are_refused(architecture, attribute, value) -> None:
    model = tiny_model(TinyParams(architecture=architecture, num_hidden_layers=1, hidden_size=16))
    layout_of(model)
    setattr(model.config, attribute, value)
    with pytest.raises(
        UnsupportedModelError, match=rf"{type(model).__name__} with {attribute}={value} is not supported"
    ):
        check_hook(model, HookPoint(0, "mlp_out"))
