"""Where each architecture family keeps its decoder blocks and what saex's hook points are on it.

One ``Layout`` per family in ``LAYOUTS``, keyed by ``config.model_type``; a family saex does not know is added by a
plugin (``register_layouts``, docs/MODELS.md), whose layout the runner attaches to the loaded model
(``attach_layout``), so no spine edit is needed. ``attn_out`` and ``mlp_out`` are the outputs (first element) of the
named submodules of a block, chosen so that each is what the attention / MLP adds to the residual stream, as
TransformerLens's ``hook_attn_out`` / ``hook_mlp_out``: Gemma-2/3 after their post-norms, Bloom at the output
projections (its attention and MLP modules return their output plus the residual). Every supported layout is
additive, ``resid_post = resid_pre + attn_out + mlp_out``, sequential or parallel (GPT-NeoX, Falcon: the MLP
reads ``resid_pre``); configurations where that fails are refused (``Requirement``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace

from torch import nn

from saex.plugin.protocols import Layout, Requirement

_LLAMA = Layout("model.layers", "self_attn", "mlp")
_GEMMA = Layout("model.layers", "post_attention_layernorm", "post_feedforward_layernorm")
# routers (mlp.gate) stay dense by default, as in llm-compressor's MoE examples; Qwen3-MoE's dense layers included
_MOE = replace(_LLAMA, targets=r"(self_attn|mlp\.experts)\..*|mlp\.(gate|up|down)_proj")

LAYOUTS: dict[str, Layout] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "phi3": _LLAMA,
    "mixtral": _MOE,
    "qwen3_moe": _MOE,
    "gemma2": _GEMMA,
    "gemma3_text": _GEMMA,
    "gemma3": replace(_GEMMA, blocks="model.language_model.layers"),  # text tower of Gemma3ForConditionalGeneration
    "gpt2": Layout("transformer.h", "attn", "mlp"),
    "gpt_neox": Layout("gpt_neox.layers", "attention", "mlp"),
    "opt": Layout(
        "model.decoder.layers",
        "self_attn",
        "fc2",
        requires=(
            Requirement(
                "do_layer_norm_before",
                True,
                "OPT-350m normalises after each residual add, so attn_out and mlp_out are not terms of resid_post",
            ),
        ),
    ),
    "falcon": Layout("transformer.h", "self_attention", "mlp", tuple_output=True),
    "bloom": Layout(
        "transformer.h",
        "self_attention.dense",
        "mlp.dense_4h_to_h",
        tuple_output=True,
        requires=(
            Requirement(
                "apply_residual_connection_post_layernorm",
                False,
                "the residual added to attention and MLP is then the normalised stream, not resid_pre",
            ),
            Requirement(
                "slow_but_exact",
                False,
                "with pretraining_tp > 1 the output projections then bypass their modules, so no hook sees them",
            ),
        ),
    ),
}


LAYOUT_ATTRIBUTE = "saex_layout"  # where a plugin's layout rides on a loaded model (kept by deepcopy)


class UnsupportedModelError(ValueError):
    """The model has no layout in ``LAYOUTS``, or a configuration its layout refuses."""


def layout_of(model: nn.Module) -> Layout:
    """The model's layout; raises ``UnsupportedModelError`` naming the model class and the supported types."""
    name = type(model).__name__
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    layout = getattr(model, LAYOUT_ATTRIBUTE, None) or LAYOUTS.get(model_type)  # type: ignore[arg-type]
    if layout is None:
        raise UnsupportedModelError(
            f"{name} (model_type {model_type!r}) has no hook layout; supported model types: "
            f"{', '.join(sorted(LAYOUTS))} (a plugin adds one: docs/MODELS.md)"
        )
    for req in layout.requires:
        if getattr(model.config, req.attribute, req.value) != req.value:
            raise UnsupportedModelError(
                f"{name} with {req.attribute}={getattr(model.config, req.attribute)!r} is not supported: {req.why}"
            )
    return layout


def attach_layout(model: nn.Module, registered: Mapping[str, tuple[str, Layout]]) -> None:
    """Give ``model`` the layout a plugin registered for its ``model_type`` (``registered``: model type ->
    (plugin, layout)); a plugin may add a family, never replace a built-in one."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in registered:
        return
    plugin, layout = registered[model_type]
    if model_type in LAYOUTS:
        raise UnsupportedModelError(
            f"plugin {plugin!r} registers a layout for model_type {model_type!r}, which saex has built in; "
            "a plugin adds layouts for other model types only"
        )
    setattr(model, LAYOUT_ATTRIBUTE, layout)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder blocks, in order."""
    layout = layout_of(model)
    try:
        blocks = model.get_submodule(layout.blocks)
    except AttributeError:
        blocks = None
    if not isinstance(blocks, nn.ModuleList):
        raise UnsupportedModelError(
            f"{type(model).__name__} (model_type {model.config.model_type!r}) has no decoder blocks at "
            f"{layout.blocks!r}, where its layout expects them"
        )
    return blocks


def default_targets(model: nn.Module) -> str:
    """Regex (full match) of the weights a compression touches by default: the layout's targets in every block."""
    layout = layout_of(model)
    return rf"{re.escape(layout.blocks)}\.\d+\.(?:{layout.targets})"
