"""The precision of model passes (a matrix's ``precision``): float32, the reference, or bfloat16 where the
device computes it natively (CUDA, or a CPU with AVX-512 BF16 / AMX, which oneDNN uses). Models are compressed in
float32 and cast afterwards; activations are stored and SAEs compute in float32 either way."""

from __future__ import annotations

import copy

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def unsupported(precision: str, device: torch.device) -> str | None:
    """Why ``device`` cannot run model passes in ``precision`` (None: it can). Emulated bfloat16 on a CPU without
    bf16 instructions is several times slower than float32, so it is refused rather than silently slow."""
    if precision == "bfloat16" and device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "this CPU has no bfloat16 instructions (AVX-512 BF16 or AMX); valid here: float32"
    return None


def in_precision(model: nn.Module, precision: str, *, copy_first: bool) -> nn.Module:
    """``model`` in ``precision``: itself for float32, else cast (a cast copy when ``copy_first``, so the float32
    model stays the reference compressions start from)."""
    if precision == "float32":
        return model
    return (copy.deepcopy(model) if copy_first else model).to(DTYPES[precision])
