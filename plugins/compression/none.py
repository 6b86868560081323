"""The ``none`` compression: the uncompressed model, the control every compressed cell is compared with."""

from __future__ import annotations

from typing import TYPE_CHECKING

from saex import CompressionContext, CompressionExpectation, NoParams, hookimpl

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class NoCompression:
    name = "none"
    description = "no compression: the model unchanged (the reference M)"
    Params = NoParams

    def compress(self, model: "PreTrainedModel", params: NoParams, ctx: CompressionContext) -> "PreTrainedModel":
        return model

    def expectation(self, model: "PreTrainedModel", params: NoParams) -> CompressionExpectation:
        return CompressionExpectation(unchanged=True)


@hookimpl
def register_compressors(register):
    register(NoCompression())
