"""SparseGPT (Frantar & Alistarh 2023, arXiv 2301.00774) through llm-compressor's ``SparseGPTModifier``.

Prunes column block by column block with the inverse Hessian of the calibration inputs, updating the kept
weights to compensate; unstructured or N:M. Calibrated on the corpus's calibration split, in order and seeded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from saex import CompressionContext, CompressionExpectation, hookimpl
from saex.plugins.compression.llmcompressor_oneshot import prune, pruning_expectation
from saex.plugins.compression.magnitude import PruningParams

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class SparseGPT:
    name = "sparsegpt"
    description = "SparseGPT pruning with Hessian-based weight update, unstructured or N:M, via llm-compressor"

    class Params(PruningParams):
        block_size: int = Field(128, gt=0, description="columns pruned per pass")
        dampening_frac: float = Field(0.01, gt=0, lt=1, description="Hessian dampening, fraction of its mean diagonal")

    def compress(self, model: "PreTrainedModel", params: Params, ctx: CompressionContext) -> "PreTrainedModel":
        from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier

        return prune(
            model, params, ctx, SparseGPTModifier, block_size=params.block_size, dampening_frac=params.dampening_frac
        )

    def expectation(self, model: "PreTrainedModel", params: Params) -> CompressionExpectation:
        return pruning_expectation(model, params)


@hookimpl
def register_compressors(register):
    register(SparseGPT())
