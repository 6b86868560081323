"""GPT-2-style ``Conv1D`` modules replaced by the ``nn.Linear`` they compute, so that every compression reaches
them: llm-compressor and hqq match ``nn.Linear`` only, and N:M patterns and quantization groups run along the
input dimension of an [out, in] weight, which Conv1D stores transposed. The same function, bit for bit on the
machines measured (docs/MODELS.md); the module names do not change.
"""

from __future__ import annotations

import torch
from torch import nn


def conv1d_to_linear(model: nn.Module) -> nn.Module:
    """Replace every transformers ``Conv1D`` in ``model`` (in place) by an equal ``nn.Linear``; returns ``model``."""
    from transformers.pytorch_utils import Conv1D

    for name, module in list(model.named_modules()):
        if isinstance(module, Conv1D):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, _linear(module))
    return model


def _linear(conv: nn.Module) -> nn.Linear:
    weight = conv.weight  # [in, out]
    linear = nn.Linear(weight.shape[0], weight.shape[1], bias=conv.bias is not None, device=weight.device)
    with torch.no_grad():
        linear.weight.copy_(weight.t())
        if conv.bias is not None:
            linear.bias.copy_(conv.bias)
    return linear.to(weight.dtype).requires_grad_(weight.requires_grad)
