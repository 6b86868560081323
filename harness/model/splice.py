"""Scoring SAEs by splicing them into the model: the layers before the hook run once per batch, the layers
from the hook on run once per variant (clean, zero-ablated, each SAE).

The suffix is the real model's forward pass: the blocks before the hook's layer are swapped, in place and for
the duration of the pass, for pass-throughs, and block L receives the cached residual stream. Every block keeps
its index, so the per-layer attention type, mask and RoPE the model picks by index (Gemma-2/3 local/global,
Qwen2 sliding window) stay right, and the model builds its masks and position embeddings itself.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from saex.model.hookpoints import HookPoint, Transform, capture, replace_block_input, spliced
from saex.model.layouts import decoder_layers, layout_of

Variant = Transform | None  # None = clean (no replacement)


def prefix(model: nn.Module, ids: torch.Tensor, hook: HookPoint) -> torch.Tensor:
    """The residual stream entering the hook's layer, [batch, seq, d]; later layers are not run."""
    start = HookPoint(hook.layer, "resid_pre")
    return capture(model, ids, [start])[start]


class Prefixes:
    """:func:`prefix` memoized per (layer, token batch) for one model, kept on the CPU: the hooks of one layer, the
    splice metrics and the groups scored on that model share one prefix pass per batch (same batch, same
    values: the memo returns exactly what the pass returned)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.found: dict[tuple, torch.Tensor] = {}

    def __call__(self, ids: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        digest = hashlib.blake2b(ids.cpu().numpy().tobytes(), digest_size=16).digest()
        key = (hook.layer, tuple(ids.shape), digest)
        if key not in self.found:
            self.found[key] = prefix(self.model, ids, hook).cpu()
        return self.found[key].to(ids.device)


class _PassThrough(nn.Module):
    """Stands in for a block before the hook's layer: returns its input, shaped as the block's output."""

    def __init__(self, tuple_output: bool):
        super().__init__()
        self.tuple_output = tuple_output

    def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> object:
        return (hidden_states, None) if self.tuple_output else hidden_states


@contextmanager
def _from_layer(model: nn.Module, layer: int, hidden: torch.Tensor) -> Iterator[None]:
    """Forward passes run only blocks ``layer``.. on ``hidden``; the earlier blocks are not run."""
    blocks, tuple_output = decoder_layers(model), layout_of(model).tuple_output
    skipped = list(blocks[:layer])
    for i in range(layer):
        blocks[i] = _PassThrough(tuple_output)
    handle = replace_block_input(blocks[layer], lambda x: hidden, prepend=True)
    try:
        yield
    finally:
        handle.remove()
        for i, block in enumerate(skipped):
            blocks[i] = block


@torch.no_grad()
def suffix_logits(
    model: nn.Module, hidden: torch.Tensor, hook: HookPoint, fn: Variant, mask: torch.Tensor | None
) -> torch.Tensor:
    """Logits of the model from ``hidden`` (the output of :func:`prefix`) with the activation at ``hook``
    replaced by ``fn(activation)`` where ``mask`` is True (everywhere when ``mask`` is None)."""
    # only the shape of the embeddings matters: block L's input is replaced by ``hidden``
    width = model.get_input_embeddings().embedding_dim
    embeds = hidden.new_zeros(*hidden.shape[:-1], width)
    with _from_layer(model, hook.layer, hidden):
        if fn is None:
            return model(inputs_embeds=embeds, use_cache=False).logits
        with spliced(model, hook, fn, mask):
            return model(inputs_embeds=embeds, use_cache=False).logits


def sae_transform(sae: nn.Module) -> Transform:
    """An SAE as a splice: reconstruct [batch, seq, d] activations in float32 and cast back."""

    def reconstruct(x: torch.Tensor) -> torch.Tensor:
        x_hat, _ = sae(x.reshape(-1, x.shape[-1]).float())
        return x_hat.reshape(x.shape).to(x.dtype)

    return reconstruct


def zero_ablation(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(x)
