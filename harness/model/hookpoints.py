"""Hook points ``layers.{L}.resid_pre|resid_post|mlp_out|attn_out`` mapped onto HF decoder blocks.

Each name means what TransformerLens / SAELens mean by it: ``resid_pre`` is the input of block L,
``resid_post`` its output (before the final norm, for the last block), ``attn_out`` / ``mlp_out`` what the
attention / MLP adds to the residual stream. Where they sit on each architecture is ``saex.model.layouts``. Hooks sit
on blocks and their submodules, never on a Linear, so they keep working after compression replaced Linears.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from saex.model.layouts import decoder_layers, layout_of

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


def check_hook(model: nn.Module, hook: HookPoint) -> None:
    """Raise ``ValueError`` (``UnsupportedModelError`` for a model without a layout) when ``hook`` is not on
    ``model``."""
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


def replace_block_input(block: nn.Module, fn: Transform, *, prepend: bool = False) -> RemovableHandle:
    """A pre-hook on ``block`` that replaces its hidden-states input ``x`` by ``fn(x)``."""

    def pre(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (fn(args[0]), *args[1:]), kwargs
        return args, dict(kwargs, hidden_states=fn(kwargs["hidden_states"]))

    return block.register_forward_pre_hook(pre, with_kwargs=True, prepend=prepend)


def _attach(model: nn.Module, hook: HookPoint, fn: Transform) -> list[RemovableHandle]:
    """Attach ``fn`` (activation [batch, seq, d] -> replacement or the same tensor) at ``hook``."""
    check_hook(model, hook)
    block = decoder_layers(model)[hook.layer]
    if hook.site == "resid_pre":
        return [replace_block_input(block, fn)]
    if hook.site == "resid_post":
        return [block.register_forward_hook(lambda m, a, output: _replace_first(output, fn(_first(output))))]
    layout = layout_of(model)
    module = block.get_submodule(layout.attn_out if hook.site == "attn_out" else layout.mlp_out)
    # OPT's MLP runs on [batch * seq, d]: present every site as [batch, seq, d], the block input's leading shape
    lead: list[torch.Size] = []

    def record_shape(m: nn.Module, args: tuple, kwargs: dict) -> None:
        lead[:] = [(args[0] if args else kwargs["hidden_states"]).shape[:-1]]

    def site(m: nn.Module, args: tuple, output: object) -> object:
        x = _first(output)
        return _replace_first(output, fn(x.view(*lead[0], x.shape[-1])).reshape(x.shape))

    return [block.register_forward_pre_hook(record_shape, with_kwargs=True), module.register_forward_hook(site)]


@contextmanager
def hooks_attached(model: nn.Module, transforms: dict[HookPoint, Transform]) -> Iterator[None]:
    handles: list[RemovableHandle] = []
    try:
        for hook, fn in transforms.items():
            handles += _attach(model, hook, fn)
        yield
    finally:
        for handle in handles:
            handle.remove()


def capture(
    model: nn.Module, input_ids: torch.Tensor, hooks: list[HookPoint], *, stop_early: bool = True
) -> dict[HookPoint, torch.Tensor]:
    """Run ``model`` on ``input_ids`` and return the activation [batch, seq, d] at each hook point.

    With ``stop_early`` the forward pass ends right after the last hook fires: later layers never run.
    Activations are copies: Falcon adds attention to its MLP output in place, after the hook.
    """
    captured: dict[HookPoint, torch.Tensor] = {}
    last = max(hooks, key=_order_key)

    def recorder(hook: HookPoint) -> Transform:
        def record(x: torch.Tensor) -> torch.Tensor:
            captured[hook] = x.detach().clone()
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


Mask = torch.Tensor | Callable[[], torch.Tensor] | None


@contextmanager
def spliced(model: nn.Module, hook: HookPoint, fn: Transform, mask: Mask = None) -> Iterator[None]:
    """Replace the activation at ``hook`` by ``fn(activation)`` during forward passes in this block.

    ``mask`` [batch, seq] (True = replace) restricts the splice to some positions (non-special tokens); a
    function returning it is read at every pass, for passes whose inputs are known only then (generation).
    """

    def splice(x: torch.Tensor) -> torch.Tensor:
        new = fn(x)
        where = mask() if callable(mask) else mask
        return new if where is None else torch.where(where.unsqueeze(-1), new, x)

    with hooks_attached(model, {hook: splice}):
        yield
