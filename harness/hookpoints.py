"""Hook points ``layers.{L}.resid_pre|resid_post|mlp_out|attn_out`` mapped onto HF decoder modules.

Works for the Llama family (and Qwen2 / Mistral, which share the layout) and keeps working after
compression, because it hooks decoder layers and their ``mlp`` / ``self_attn`` children, never a Linear.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

HOOK_SITES = ("resid_pre", "resid_post", "mlp_out", "attn_out")
_HOOK_RE = re.compile(r"^layers\.(\d+)\.(\w+)$")


@dataclass(frozen=True)
class HookPoint:
    layer: int
    site: str

    def __str__(self) -> str:
        return f"layers.{self.layer}.{self.site}"


def parse_hook(name: str) -> HookPoint:
    match = _HOOK_RE.match(name)
    if not match or match.group(2) not in HOOK_SITES:
        raise ValueError(
            f"bad hook point {name!r}; expected layers.<L>.<site> with site one of {', '.join(HOOK_SITES)}"
        )
    return HookPoint(int(match.group(1)), match.group(2))


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no model.layers: only Llama-family layouts are supported")
    return layers


def check_hook(model: nn.Module, hook: HookPoint) -> None:
    n = len(decoder_layers(model))
    if not 0 <= hook.layer < n:
        raise ValueError(f"hook point {hook}: the model has {n} layers (valid layers 0..{n - 1})")


class StopForward(Exception):
    """Raised by a capture hook after the last needed layer, so the rest of the forward pass is skipped."""


Transform = Callable[[torch.Tensor], torch.Tensor]


def _first(output: object) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output  # type: ignore[index]


def _replace_first(output: object, new: torch.Tensor) -> object:
    return (new, *output[1:]) if isinstance(output, tuple) else new  # type: ignore[index]


def _attach(model: nn.Module, hook: HookPoint, fn: Transform) -> torch.utils.hooks.RemovableHandle:
    """Attach ``fn`` (activation [batch, seq, d] -> replacement or the same tensor) at ``hook``."""
    check_hook(model, hook)
    layer = decoder_layers(model)[hook.layer]
    if hook.site == "resid_pre":

        def pre(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if args:
                return (fn(args[0]), *args[1:]), kwargs
            kwargs = dict(kwargs, hidden_states=fn(kwargs["hidden_states"]))
            return args, kwargs

        return layer.register_forward_pre_hook(pre, with_kwargs=True)
    module = {"resid_post": layer, "mlp_out": layer.mlp, "attn_out": layer.self_attn}[hook.site]
    return module.register_forward_hook(lambda m, a, output: _replace_first(output, fn(_first(output))))


@contextmanager
def hooks_attached(model: nn.Module, transforms: dict[HookPoint, Transform]) -> Iterator[None]:
    handles = [_attach(model, hook, fn) for hook, fn in transforms.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def capture(
    model: nn.Module, input_ids: torch.Tensor, hooks: list[HookPoint], *, stop_early: bool = True
) -> dict[HookPoint, torch.Tensor]:
    """Run ``model`` on ``input_ids`` and return the activation [batch, seq, d] at each hook point.

    With ``stop_early`` the forward pass ends right after the last hook fires: later layers never run.
    """
    captured: dict[HookPoint, torch.Tensor] = {}
    last = max(hooks, key=_order_key)

    def recorder(hook: HookPoint) -> Transform:
        def record(x: torch.Tensor) -> torch.Tensor:
            captured[hook] = x.detach()
            if stop_early and hook == last:
                raise StopForward
            return x

        return record

    with hooks_attached(model, {h: recorder(h) for h in hooks}), torch.no_grad(), contextlib.suppress(StopForward):
        model(input_ids=input_ids, use_cache=False)
    return captured


def _order_key(hook: HookPoint) -> tuple[int, int]:
    """Execution order inside a layer: resid_pre, attn_out, mlp_out, resid_post."""
    return hook.layer, ("resid_pre", "attn_out", "mlp_out", "resid_post").index(hook.site)


@contextmanager
def spliced(model: nn.Module, hook: HookPoint, fn: Transform, mask: torch.Tensor | None = None) -> Iterator[None]:
    """Replace the activation at ``hook`` by ``fn(activation)`` during forward passes in this block.

    ``mask`` [batch, seq] (True = replace) restricts the splice to some positions (non-special tokens).
    """

    def splice(x: torch.Tensor) -> torch.Tensor:
        new = fn(x)
        return new if mask is None else torch.where(mask.unsqueeze(-1), new, x)

    with hooks_attached(model, {hook: splice}):
        yield
