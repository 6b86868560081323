"""Unstructured magnitude pruning: in each targeted Linear layer, zero the smallest-|w| weights.

The simplest data-free baseline (no calibration). Each layer gets exactly ``round(sparsity * numel)`` zeros,
whatever the ties, so the sparsity is the same in every layer and the result is reproducible. N:M patterns
would add a params field and a second mask function beside ``smallest_magnitude_mask``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from pydantic import BaseModel, ConfigDict, Field

from harness.protocols import CompressionContext, CompressionExpectation
from harness.spec import hookimpl
from harness.verify import Targets, linear_layers

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class Magnitude:
    name = "magnitude"
    description = "unstructured magnitude pruning: zero the smallest |w| in each targeted Linear layer"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        sparsity: float = Field(
            ge=0.0, lt=1.0, allow_inf_nan=False,
            description="fraction of weights set to zero in every targeted Linear layer, 0 <= sparsity < 1",
        )
        targets: Targets = Field(default_factory=Targets, description="which Linear layers are pruned")

    def compress(self, model: "PreTrainedModel", params: Params, ctx: CompressionContext) -> "PreTrainedModel":
        with torch.no_grad():
            for layer in linear_layers(model, params.targets).values():
                n_zero = round(params.sparsity * layer.weight.numel())
                layer.weight.masked_fill_(smallest_magnitude_mask(layer.weight, n_zero), 0)
        return model

    def expectation(self, model: "PreTrainedModel", params: Params) -> CompressionExpectation:
        return CompressionExpectation(
            sparsity=params.sparsity, targets=list(linear_layers(model, params.targets))
        )


def smallest_magnitude_mask(weight: torch.Tensor, n_zero: int) -> torch.Tensor:
    """Boolean mask (shape of ``weight``) with exactly ``n_zero`` True entries: the smallest |w|.

    Ties at the threshold are broken by flat index (lowest first), so the mask is deterministic.
    """
    flat = weight.detach().abs().flatten()
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if n_zero <= 0:
        return mask.view_as(weight)
    threshold = flat.float().kthvalue(n_zero).values.to(flat.dtype)
    mask |= flat < threshold
    ties = (flat == threshold).nonzero().squeeze(1)
    mask[ties[: n_zero - int(mask.sum())]] = True
    return mask.view_as(weight)


@hookimpl
def register_compressors(register):
    register(Magnitude())
