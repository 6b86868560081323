"""Round-to-nearest integer quantization via llm-compressor's ``QuantizationModifier``: data-free min-max
scales per group (or per channel); optionally dynamic per-token int8 input activations (W8A8).

Weights are written back as their quantized values: weight-only schemes leave plain ``nn.Linear`` modules;
with activation quantization the module keeps compressed-tensors' forward for the inputs only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from saex import hookimpl
from saex.plugins.compression.llmcompressor_oneshot import OneshotQuantizer, QuantParams, quantization_modifier

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class RTN(OneshotQuantizer):
    name = "rtn"
    description = "round-to-nearest int4/int8 weights (W4/W8, group size default 64) or W8A8, via llm-compressor"

    class Params(QuantParams):
        activation_bits: Literal[8] | None = Field(
            None,
            description="8: also quantize Linear inputs to int8, dynamic per token (W8A8 with bits 8 "
            "and group_size null); null: weight-only",
        )

    def modifier(self, model: "PreTrainedModel", params: Params):
        from llmcompressor.modifiers.quantization import QuantizationModifier

        return quantization_modifier(QuantizationModifier, model, params, params.activation_bits)


@hookimpl
def register_compressors(register):
    register(RTN())
