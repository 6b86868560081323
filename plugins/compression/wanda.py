"""Wanda pruning (Sun et al. 2023, arXiv 2306.11695) through llm-compressor's ``WandaPruningModifier``.

Score |w| * ||x_j||_2 (input-feature norms over the calibration tokens); unstructured pruning zeroes the
lowest scores in each output row (``int(in_features * sparsity)`` per row), N:M the lowest M - N in every group
of M input weights. Calibrated on the corpus's calibration split, in order and seeded (reproducible).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from saex import CompressionContext, CompressionExpectation, hookimpl, linear_layers
from saex.plugins.compression.llmcompressor_oneshot import prune, pruning_expectation
from saex.plugins.compression.magnitude import PruningParams

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class Wanda:
    name = "wanda"
    description = "Wanda pruning (|w| x input norm), unstructured or N:M, via llm-compressor; calibrated"

    class Params(PruningParams):
        pass

    def compress(self, model: "PreTrainedModel", params: Params, ctx: CompressionContext) -> "PreTrainedModel":
        from llmcompressor.modifiers.pruning.wanda import WandaPruningModifier

        return prune(model, params, ctx, WandaPruningModifier)

    def expectation(self, model: "PreTrainedModel", params: Params) -> CompressionExpectation:
        expectation = pruning_expectation(model, params)
        # per row it zeroes int(in_features * sparsity) weights: up to one weight per row short
        narrowest = min(layer.in_features for layer in linear_layers(model, params.targets).values())
        expectation.tolerance = max(expectation.tolerance, 1 / narrowest)
        return expectation


@hookimpl
def register_compressors(register):
    register(Wanda())
