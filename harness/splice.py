"""Scoring SAEs by splicing them into the model: the layers before the hook run once per batch, the layers
from the hook on run once per variant (clean, zero-ablated, each SAE).

The suffix is run by temporarily giving the HF model only the decoder layers from the hook's layer on and
feeding the cached residual stream as ``inputs_embeds``: the model builds its own causal mask and rotary
embeddings, so this stays correct across attention implementations and after compression.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from saex.hookpoints import HookPoint, Transform, capture, decoder_layers, spliced

Variant = Transform | None  # None = clean (no replacement)


def prefix(model: nn.Module, ids: torch.Tensor, hook: HookPoint) -> torch.Tensor:
    """The residual stream entering the hook's layer, [batch, seq, d]; later layers are not run."""
    start = HookPoint(hook.layer, "resid_pre")
    return capture(model, ids, [start])[start]


@contextmanager
def _only_layers_from(model: nn.Module, layer: int) -> Iterator[None]:
    inner = model.model
    layers = decoder_layers(model)
    inner.layers = nn.ModuleList(list(layers)[layer:])
    try:
        yield
    finally:
        inner.layers = layers


@torch.no_grad()
def suffix_logits(
    model: nn.Module, hidden: torch.Tensor, hook: HookPoint, fn: Variant, mask: torch.Tensor | None
) -> torch.Tensor:
    """Logits of the model from ``hidden`` (the output of :func:`prefix`) with the activation at ``hook``
    replaced by ``fn(activation)`` where ``mask`` is True (everywhere when ``mask`` is None)."""
    with _only_layers_from(model, hook.layer):
        local = HookPoint(0, hook.site)
        if fn is None:
            return model(inputs_embeds=hidden, use_cache=False).logits
        with spliced(model, local, fn, mask):
            return model(inputs_embeds=hidden, use_cache=False).logits


def sae_transform(sae: nn.Module) -> Transform:
    """An SAE as a splice: reconstruct [batch, seq, d] activations in float32 and cast back."""

    def reconstruct(x: torch.Tensor) -> torch.Tensor:
        x_hat, _ = sae(x.reshape(-1, x.shape[-1]).float())
        return x_hat.reshape(x.shape).to(x.dtype)

    return reconstruct


def zero_ablation(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(x)
