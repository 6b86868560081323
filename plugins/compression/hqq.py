"""Half-Quadratic Quantization (HQQ, Badri & Shaji 2023) through the hqq library's own API: each targeted
``nn.Linear`` is replaced by an ``HQQLinear`` holding packed 1/2/3/4/8-bit weights with per-group scale and
zero point (found by hqq's half-quadratic optimiser; no calibration data).

The transformers ``HqqConfig`` route fails on CPU, so the layers are swapped here directly. ``compute_dtype``
is the layer's own dtype (float32 for saex models), the device is ``ctx.device`` (CPU or CUDA).
Verification reads the weight through ``HQQLinear.dequantize()`` (saex.model.verify.dense_weight).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from saex import CompressionContext, CompressionExpectation, Targets, check_group_size, hookimpl, linear_layers

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class HQQ:
    name = "hqq"
    description = "HQQ weight quantization (1/2/3/4/8 bit, group size, axis) with hqq's HQQLinear; data-free"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        nbits: Literal[1, 2, 3, 4, 8] = Field(4, description="weight bit width: 1, 2, 3, 4 or 8")
        group_size: int | None = Field(
            64,
            gt=0,
            description="weights per group, a multiple of 8 dividing every targeted layer's input width "
            "(axis 1) or output width (axis 0); null = one group per row (axis 1) or column (axis 0)",
        )
        axis: Literal[0, 1] = Field(
            1, description="1: groups along the input dim (hqq's default); 0: hqq's axis-0 layout"
        )
        targets: Targets = Field(default_factory=Targets, description="which Linear layers are quantized")

        @field_validator("group_size")
        @classmethod
        def _multiple_of_8(cls, value: int | None) -> int | None:
            if value is not None and value % 8:
                raise ValueError(f"hqq needs a group_size that is a multiple of 8, got {value}")
            return value

    def compress(self, model: "PreTrainedModel", params: Params, ctx: CompressionContext) -> "PreTrainedModel":
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

        layers = linear_layers(model, params.targets)
        check_group_size(layers, params.group_size, params.axis)
        config = BaseQuantizeConfig(nbits=params.nbits, group_size=params.group_size, axis=params.axis)
        for name, layer in layers.items():
            quantized = HQQLinear(
                layer, quant_config=config, compute_dtype=layer.weight.dtype, device=str(ctx.device), del_orig=True
            )
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, quantized)
        return model

    def expectation(self, model: "PreTrainedModel", params: Params) -> CompressionExpectation:
        layers = linear_layers(model, params.targets)
        check_group_size(layers, params.group_size, params.axis)
        return CompressionExpectation(
            targets=list(layers), bits=params.nbits, group_size=params.group_size, group_axis=params.axis
        )


@hookimpl
def register_compressors(register):
    register(HQQ())
