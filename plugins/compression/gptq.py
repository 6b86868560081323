"""GPTQ weight-only integer quantization (Frantar et al. 2022, arXiv 2210.17323) via llm-compressor's
``GPTQModifier``: column by column, each weight rounded to the grid and the error spread onto the columns not
yet quantized with the inverse Hessian of the calibration inputs.

The quantized values are written back into plain ``nn.Linear`` weights (bit-identical logits, no fake
quantization on every forward). Default group size 64, because llm-compressor's W4A16 preset (group 128) does
not divide SmolLM2's 576 columns.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from saex import hookimpl
from saex.plugins.compression.llmcompressor_oneshot import OneshotQuantizer, QuantParams, quantization_modifier

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class GPTQ(OneshotQuantizer):
    name = "gptq"
    description = "GPTQ weight-only int4/int8 quantization (group size default 64) via llm-compressor; calibrated"

    class Params(QuantParams):
        block_size: int = Field(128, gt=0, description="columns quantized per pass")
        dampening_frac: float = Field(0.01, gt=0, lt=1, description="Hessian dampening, fraction of its mean diagonal")

    def modifier(self, model: "PreTrainedModel", params: Params):
        from llmcompressor.modifiers.gptq import GPTQModifier

        return quantization_modifier(
            GPTQModifier, model, params, block_size=params.block_size, dampening_frac=params.dampening_frac
        )


@hookimpl
def register_compressors(register):
    register(GPTQ())
