"""Hook points on HF Llama decoder layers: what each site captures, early stopping, splicing, hook cleanup."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from torch import nn

from saex.model.hookpoints import (
    HOOK_SITES,
    HookPoint,
    capture,
    check_hook,
    decoder_layers,
    hooks_attached,
    parse_hook,
    spliced,
)
from saex.model.layouts import UnsupportedModelError
from saex.plugin.protocols import LoadedModel

pytestmark = pytest.mark.usefixtures("single_thread")

N_LAYERS = 4


@pytest.fixture
def model(tiny_llama: LoadedModel) -> nn.Module:
    return tiny_llama.model


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(3, 259, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@contextmanager
def recording(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """A plain forward hook on ``module`` that records the first element of its output."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_hook(
        lambda m, a, out: seen.append((out[0] if isinstance(out, tuple) else out).detach().clone())
    )
    try:
        yield seen
    finally:
        handle.remove()


@contextmanager
def counting(modules: dict[str, nn.Module]) -> Iterator[dict[str, int]]:
    calls = {name: 0 for name in modules}
    handles = []
    for name, module in modules.items():
        handles.append(
            module.register_forward_hook(lambda m, a, out, name=name: calls.__setitem__(name, calls[name] + 1))
        )
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def hook_state(model: nn.Module) -> dict[str, tuple[list[int], list[int]]]:
    """Ids of the forward (pre-)hooks on every module; transformers itself may install permanent ones."""
    return {name: (list(m._forward_hooks), list(m._forward_pre_hooks)) for name, m in model.named_modules()}


# --- what each site captures ---------------------------------------------------------------------------------


def test_resid_pre_and_resid_post_match_hf_hidden_states(model: nn.Module, ids: torch.Tensor) -> None:
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    assert len(hidden) == N_LAYERS + 1
    hooks = [HookPoint(layer, site) for layer in range(N_LAYERS) for site in ("resid_pre", "resid_post")]
    got = capture(model, ids, hooks, stop_early=False)
    for layer in range(N_LAYERS):
        assert got[HookPoint(layer, "resid_pre")].shape == (2, 12, 64)
        assert torch.equal(got[HookPoint(layer, "resid_pre")], hidden[layer])
        if layer < N_LAYERS - 1:
            assert torch.equal(got[HookPoint(layer, "resid_post")], hidden[layer + 1])
    # HF replaces the last hidden state by its final-norm output; resid_post is the raw residual before it.
    last = got[HookPoint(N_LAYERS - 1, "resid_post")]
    assert not torch.equal(last, hidden[N_LAYERS])
    with torch.no_grad():
        assert torch.equal(model.model.norm(last), hidden[N_LAYERS])


def test_resid_pre_of_next_layer_is_resid_post_of_previous(model: nn.Module, ids: torch.Tensor) -> None:
    got = capture(model, ids, [HookPoint(1, "resid_post"), HookPoint(2, "resid_pre")])
    assert torch.equal(got[HookPoint(1, "resid_post")], got[HookPoint(2, "resid_pre")])


@pytest.mark.parametrize("site,child", [("mlp_out", "mlp"), ("attn_out", "self_attn")])
def test_mlp_and_attn_out_match_plain_forward_hooks(model: nn.Module, ids: torch.Tensor, site: str, child: str) -> None:
    for layer in range(N_LAYERS):
        with recording(getattr(decoder_layers(model)[layer], child)) as seen:
            got = capture(model, ids, [HookPoint(layer, site)], stop_early=False)
        assert len(seen) == 1
        assert torch.equal(got[HookPoint(layer, site)], seen[0])


def test_sites_add_up_to_the_residual_stream(model: nn.Module, ids: torch.Tensor) -> None:
    hooks = [HookPoint(2, site) for site in HOOK_SITES]
    got = capture(model, ids, hooks)
    pre, post = got[HookPoint(2, "resid_pre")], got[HookPoint(2, "resid_post")]
    torch.testing.assert_close(pre + got[HookPoint(2, "attn_out")] + got[HookPoint(2, "mlp_out")], post)


# --- early stopping ------------------------------------------------------------------------------------------


def test_stop_early_captures_the_same_tensors(model: nn.Module, ids: torch.Tensor) -> None:
    hooks = [
        HookPoint(2, "resid_pre"),
        HookPoint(0, "attn_out"),
        HookPoint(1, "mlp_out"),
        HookPoint(1, "resid_post"),
        HookPoint(0, "resid_pre"),
        HookPoint(2, "attn_out"),
    ]
    early = capture(model, ids, hooks, stop_early=True)
    full = capture(model, ids, hooks, stop_early=False)
    assert set(early) == set(full) == set(hooks)
    for hook in hooks:
        assert torch.equal(early[hook], full[hook]), hook


@pytest.mark.parametrize(
    "hooks,layers_run",
    [
        ([HookPoint(0, "resid_post")], 1),
        ([HookPoint(1, "resid_pre"), HookPoint(0, "mlp_out")], 2),  # stops at layer 1's pre-hook, inside call 2
        ([HookPoint(2, "attn_out"), HookPoint(0, "resid_post"), HookPoint(1, "mlp_out")], 3),
        ([HookPoint(3, "resid_post")], 4),
    ],
)
def test_stop_early_skips_later_layers_and_lm_head(
    model: nn.Module, ids: torch.Tensor, hooks: list[HookPoint], layers_run: int
) -> None:
    layers = decoder_layers(model)
    # Pre-hooks count calls started; forward hooks count calls finished.
    started = [0] * N_LAYERS
    handles = [
        layer.register_forward_pre_hook(lambda m, a, i=i: started.__setitem__(i, started[i] + 1))
        for i, layer in enumerate(layers)
    ]
    try:
        with counting({"lm_head": model.lm_head, "norm": model.model.norm}) as calls:
            got = capture(model, ids, hooks, stop_early=True)
    finally:
        for handle in handles:
            handle.remove()
    assert set(got) == set(hooks)
    assert started == [1] * layers_run + [0] * (N_LAYERS - layers_run)
    assert calls == {"lm_head": 0, "norm": 0}

    with counting({"lm_head": model.lm_head}) as calls:
        capture(model, ids, hooks, stop_early=False)
    assert calls == {"lm_head": 1}


# --- names and ranges ----------------------------------------------------------------------------------------


def test_parse_hook_round_trips() -> None:
    for layer in (0, 3, 17):
        for site in HOOK_SITES:
            hook = parse_hook(f"layers.{layer}.{site}")
            assert hook == HookPoint(layer, site)
            assert str(hook) == f"layers.{layer}.{site}"


@pytest.mark.parametrize(
    "name",
    [
        "layers.0.resid",
        "layers.x.resid_pre",
        "blocks.0.resid_pre",
        "layers.0.resid_pre.x",
        "layers.-1.mlp_out",
        "layers.0.",
        "0.resid_pre",
        " layers.0.resid_pre",
    ],
)
def test_parse_hook_rejects_bad_names_listing_sites(name: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_hook(name)
    message = str(info.value)
    assert repr(name) in message
    for site in HOOK_SITES:
        assert site in message


def test_check_hook_names_the_valid_layer_range(model: nn.Module, ids: torch.Tensor) -> None:
    check_hook(model, HookPoint(3, "resid_post"))
    for bad in (HookPoint(4, "resid_post"), HookPoint(-1, "mlp_out")):
        with pytest.raises(ValueError, match=r"4 layers \(valid layers 0\.\.3\)"):
            check_hook(model, bad)
    with pytest.raises(ValueError, match=r"valid layers 0\.\.3"):
        capture(model, ids, [HookPoint(9, "resid_pre")])
    with pytest.raises(ValueError, match=r"valid layers 0\.\.3"), spliced(model, HookPoint(4, "attn_out"), lambda x: x):
        pass


def test_decoder_layers_rejects_other_layouts() -> None:
    with pytest.raises(UnsupportedModelError, match=r"Linear \(model_type None\) has no hook layout; supported .*gpt2"):
        decoder_layers(nn.Linear(2, 2))


# --- splicing ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("site", HOOK_SITES)
def test_identity_splice_leaves_logits_bit_identical(model: nn.Module, ids: torch.Tensor, site: str) -> None:
    clean = logits(model, ids)
    for layer in (0, 2, 3):
        with spliced(model, HookPoint(layer, site), lambda x: x):
            assert torch.equal(logits(model, ids), clean)
        with spliced(model, HookPoint(layer, site), lambda x: x * 1.5, mask=torch.zeros(2, 12, dtype=torch.bool)):
            assert torch.equal(logits(model, ids), clean)


@pytest.mark.parametrize("site", HOOK_SITES)
def test_splice_changes_logits(model: nn.Module, ids: torch.Tensor, site: str) -> None:
    clean = logits(model, ids)
    with spliced(model, HookPoint(1, site), torch.zeros_like):
        changed = logits(model, ids)
    assert (changed - clean).abs().amax() > 1e-3


def test_masked_splice_only_affects_masked_position_and_later(model: nn.Module, ids: torch.Tensor) -> None:
    clean = logits(model, ids)
    j = 5
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[0, j] = True
    with spliced(model, HookPoint(0, "resid_pre"), torch.zeros_like, mask=mask):
        out = logits(model, ids)
    assert torch.equal(out[0, :j], clean[0, :j])  # causal: earlier positions never see position j
    assert (out[0, j] - clean[0, j]).abs().amax() > 1e-3
    assert (out[0, j + 1 :] - clean[0, j + 1 :]).abs().amax() > 0  # later positions attend to it
    assert torch.equal(out[1], clean[1])  # the other sequence is untouched


def test_masked_splice_replaces_only_masked_positions_at_its_site(model: nn.Module, ids: torch.Tensor) -> None:
    """Doubling mlp_out of layer 2 at masked positions adds exactly mlp_out there to resid_post; the MLP is
    position-wise, so unmasked positions of resid_post are bit-identical."""
    mask = torch.rand(2, 12, generator=torch.Generator().manual_seed(1)) < 0.4
    assert mask.any() and not mask.all()
    hooks = [HookPoint(2, "mlp_out"), HookPoint(2, "resid_post")]
    clean = capture(model, ids, hooks)
    with spliced(model, HookPoint(2, "mlp_out"), lambda x: 2 * x, mask=mask):
        spliced_post = capture(model, ids, [HookPoint(2, "resid_post")])[HookPoint(2, "resid_post")]
    post = clean[HookPoint(2, "resid_post")]
    assert torch.equal(spliced_post[~mask], post[~mask])
    torch.testing.assert_close(spliced_post[mask] - post[mask], clean[HookPoint(2, "mlp_out")][mask])


# --- cleanup -------------------------------------------------------------------------------------------------


def test_hooks_are_removed_after_every_context(model: nn.Module, ids: torch.Tensor) -> None:
    before = hook_state(model)
    hooks = [HookPoint(layer, site) for layer in range(N_LAYERS) for site in HOOK_SITES]
    capture(model, ids, hooks, stop_early=True)
    assert hook_state(model) == before
    capture(model, ids, [HookPoint(1, "mlp_out")], stop_early=True)  # stops inside a layer
    assert hook_state(model) == before
    for hook in hooks:
        with spliced(model, hook, lambda x: x):
            assert hook_state(model) != before
        assert hook_state(model) == before
    with pytest.raises(RuntimeError, match="boom"), hooks_attached(model, {h: (lambda x: x) for h in hooks}):
        raise RuntimeError("boom")
    assert hook_state(model) == before


def test_no_saex_hooks_left_on_decoder_modules(tiny_llama: LoadedModel, ids: torch.Tensor) -> None:
    """On a model that never ran with output_hidden_states, no forward hook remains at all."""
    from saex.plugins.models.tiny_llama import TinyLlama

    model = (
        TinyLlama()
        .load(TinyLlama.Params(num_hidden_layers=2, hidden_size=16, intermediate_size=32), torch.device("cpu"))
        .model
    )
    capture(model, ids, [HookPoint(1, "resid_post"), HookPoint(0, "mlp_out"), HookPoint(1, "resid_pre")])
    with spliced(model, HookPoint(0, "attn_out"), lambda x: x):
        logits(model, ids)
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
