"""Magnitude pruning: in each targeted weight matrix, zero the smallest-|w| weights, unstructured or N:M.

The simplest data-free baseline (no calibration), and the one that reaches any weight, whatever holds it: each
expert of an MoE's 3-D expert parameter is pruned as a matrix of its own. Unstructured: each matrix gets exactly
``round(sparsity * numel)`` zeros, whatever the ties, so the sparsity is the same in every layer and the result
is reproducible. N:M (``pattern: "2:4"``): in every group of M consecutive weights along the input dimension
of each output row, the N largest |w| are kept and the others zeroed (sparsity 1 - N/M).

``PruningParams`` (sparsity, pattern, targets) is shared with the calibrated pruners (``wanda``,
``sparsegpt``) so that every pruning method is configured the same way.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from saex import CompressionContext, CompressionExpectation, Targets, hookimpl, target_weights

if TYPE_CHECKING:
    from transformers import PreTrainedModel

UNSTRUCTURED = "unstructured"


class PruningParams(BaseModel):
    """Sparsity and mask structure of a pruning method, shared by ``magnitude``, ``wanda`` and ``sparsegpt``.

    ``pattern`` is ``"unstructured"`` (needs ``sparsity``) or ``"N:M"`` (at most N non-zeros in every M
    consecutive input weights; ``sparsity`` may be left out, and when given must equal 1 - N/M).
    """

    model_config = ConfigDict(extra="forbid")

    sparsity: float | None = Field(
        None,
        ge=0.0,
        lt=1.0,
        allow_inf_nan=False,
        description="fraction of weights set to zero in every targeted weight matrix, 0 <= sparsity < 1 "
        "(implied by an N:M pattern)",
    )
    pattern: str = Field(UNSTRUCTURED, description="'unstructured' or 'N:M' with 0 < N < M, e.g. '2:4', '4:8'")
    targets: Targets = Field(default_factory=Targets, description="which weights are pruned")

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, value: str) -> str:
        if value == UNSTRUCTURED:
            return value
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", value)
        if not match or not 0 < int(match[1]) < int(match[2]):
            raise ValueError(f"pattern must be 'unstructured' or 'N:M' with 0 < N < M (e.g. '2:4'), got {value!r}")
        return f"{int(match[1])}:{int(match[2])}"

    @model_validator(mode="after")
    def _sparsity_matches_pattern(self) -> "PruningParams":
        if self.n_m is None:
            if self.sparsity is None:
                raise ValueError("sparsity is required for an unstructured pattern (e.g. sparsity: 0.5)")
        else:
            n, m = self.n_m
            implied = 1 - n / m
            if self.sparsity is not None and abs(self.sparsity - implied) > 1e-9:
                raise ValueError(
                    f"sparsity {self.sparsity} contradicts pattern {self.pattern!r}, which implies {implied:g}; "
                    "leave sparsity out for N:M patterns"
                )
        return self

    @property
    def n_m(self) -> tuple[int, int] | None:
        if self.pattern == UNSTRUCTURED:
            return None
        n, m = self.pattern.split(":")
        return int(n), int(m)

    @property
    def target_sparsity(self) -> float:
        """The sparsity every targeted layer must reach."""
        if self.n_m is not None:
            return 1 - self.n_m[0] / self.n_m[1]
        assert self.sparsity is not None
        return self.sparsity

    def expectation(self, model: "PreTrainedModel") -> CompressionExpectation:
        """What pruning with these params promises for ``model``; raises when M does not divide a layer."""
        weights = target_weights(model, self.targets)
        if self.n_m is not None:
            m = self.n_m[1]
            for name, weight in weights.items():
                if weight.shape[-1] % m:
                    raise ValueError(
                        f"pattern {self.pattern!r}: M={m} does not divide the input width {weight.shape[-1]} "
                        f"of layer {name}"
                    )
        return CompressionExpectation(sparsity=self.target_sparsity, targets=list(weights), n_m=self.n_m)


class Magnitude:
    name = "magnitude"
    description = "magnitude pruning (unstructured or N:M): zero the smallest |w| in each targeted weight matrix"

    class Params(PruningParams):
        pass

    def compress(self, model: "PreTrainedModel", params: Params, ctx: CompressionContext) -> "PreTrainedModel":
        self.expectation(model, params)  # validates N:M against the layer widths before touching anything
        with torch.no_grad():
            for weight in target_weights(model, params.targets).values():
                for matrix in weight.view(-1, *weight.shape[-2:]):  # [out, in], one per expert of a 3-D weight
                    if params.n_m is not None:
                        mask = n_m_smallest_mask(matrix, *params.n_m)
                    else:
                        mask = smallest_magnitude_mask(matrix, round(params.target_sparsity * matrix.numel()))
                    matrix.masked_fill_(mask, 0)
        return model

    def expectation(self, model: "PreTrainedModel", params: Params) -> CompressionExpectation:
        return params.expectation(model)


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


def n_m_smallest_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean mask (shape of ``weight`` [out, in]) of the M - N smallest |w| in every group of ``m``
    consecutive input weights of each row; ties are broken by position (lowest first), deterministically."""
    out_features, in_features = weight.shape
    groups = weight.detach().abs().reshape(out_features, in_features // m, m)
    order = torch.sort(groups, dim=2, stable=True).indices  # ascending |w|, stable: ties by position
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, order[..., : m - n], True)
    return mask.reshape(out_features, in_features)


@hookimpl
def register_compressors(register):
    register(Magnitude())
