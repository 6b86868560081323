"""Running llm-compressor's ``oneshot`` on an in-memory HF model: the steps ``wanda``, ``sparsegpt``, ``gptq``
and ``rtn`` share (not a plugin itself; it registers nothing).

What this handles, each measured on this machine (docs/COMPRESSION.md):
- a model built from a config has no directory: its config is saved to a scratch directory
  (``ctx.workdir`` or a temporary one) and ``config.name_or_path`` points there while ``oneshot`` runs;
- the tokenizer is passed as ``processor`` (``oneshot`` otherwise tries to load one from the model path);
- calibration data is ``ctx.calibration_tokens`` as an already tokenized dataset, in order
  (``shuffle_calibration_samples=False``) and torch is seeded with ``ctx.seed`` first, so two runs give
  bit-identical results (Wanda's unseeded shuffle flipped 0.19% of mask entries between runs);
- targets are our ``Targets`` selection (``linear_selection``: class ``Linear`` minus one combined ignore
  regex); ``re:.*lm_head`` is always ignored (a plain ``lm_head`` entry is not honoured by the pruning
  modifiers), so a selection that includes the LM head fails verification for that layer;
- quantized modules fake-quantize their weight on every forward (~12% slower): ``bake_quantized_weights``
  writes the quantized values into the weights and drops the weight fake-quantization, which gives
  bit-identical logits; modules that also quantize activations (W8A8) keep that part of their forward.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from saex import CompressionContext, CompressionExpectation, Targets, check_group_size, linear_layers

if TYPE_CHECKING:
    from llmcompressor.modifiers import Modifier
    from transformers import PreTrainedModel

    from saex.plugins.compression.magnitude import PruningParams

LM_HEAD_IGNORE = "re:.*lm_head"


class CalibrationError(ValueError):
    """The compression needs calibration data (and a tokenizer) that the context does not provide."""


def linear_selection(model: torch.nn.Module, names: Iterable[str]) -> tuple[list[str], list[str]]:
    """llm-compressor ``(targets, ignore)`` that select exactly the ``nn.Linear`` modules ``names``.

    Targets are the class ``Linear`` and the other Linear modules go into one combined ``ignore`` regex:
    llm-compressor matches every target and ignore pattern against every module many times per run, and
    one pattern per selected layer (210 on SmolLM2) cost 13 s of pure regex matching for RTN. The optional
    trailing dot is there because the pruning modifiers match ignore patterns against ``"<name>."``.
    """
    selected = set(names)
    others = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in selected]
    ignore = [LM_HEAD_IGNORE]
    if others:
        ignore.append("re:^(?:" + "|".join(re.escape(n) for n in others) + r")\.?$")
    return ["Linear"], ignore


def calibration_dataset(tokens: torch.Tensor):
    """``datasets.Dataset`` of pre-tokenized blocks (``input_ids``, ``attention_mask``), one row per block."""
    from datasets import Dataset

    ids = tokens.long().tolist()
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(row) for row in ids]})


def run_oneshot(
    model: "PreTrainedModel", recipe: "Modifier | list[Modifier]", ctx: CompressionContext
) -> "PreTrainedModel":
    """Apply ``recipe`` to ``model`` (in place) with ``oneshot``, calibrated on ``ctx.calibration_tokens``."""
    from llmcompressor import oneshot

    tokens = ctx.calibration_tokens
    if tokens is None or tokens.dim() != 2 or tokens.shape[0] == 0:
        raise CalibrationError(
            "llm-compressor methods need calibration token blocks [n_blocks, block_len]; the context has "
            f"{None if tokens is None else tuple(tokens.shape)} (give the matrix a calibration split)"
        )
    if ctx.tokenizer is None:
        raise CalibrationError("llm-compressor methods need the model's tokenizer in the compression context")
    with _scratch_dir(ctx.workdir) as scratch:  # only the config is written there
        previous = model.config.name_or_path
        model.config.save_pretrained(scratch)
        model.config.name_or_path = str(scratch)
        torch.manual_seed(ctx.seed)
        try:
            oneshot(
                model=model,
                processor=ctx.tokenizer,
                recipe=recipe,
                dataset=calibration_dataset(tokens),
                num_calibration_samples=int(tokens.shape[0]),
                max_seq_length=int(tokens.shape[1]),
                shuffle_calibration_samples=False,
                output_dir=None,
                log_dir=None,
            )
        finally:
            model.config.name_or_path = previous
    return model


def bake_quantized_weights(model: "PreTrainedModel") -> list[str]:
    """Write each quantized module's fake-quantized weight into ``weight`` and stop re-quantizing it on
    forward; a module without activation quantization goes back to a plain ``nn.Linear`` forward.
    Returns the names of the modules baked."""
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    baked = []
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None or scheme.weights is None:
            continue
        with torch.no_grad():
            quantized = forward_quantize(module, module.weight.data, "weight", scheme.weights)
            module.weight.data.copy_(quantized)
        if scheme.input_activations is None and scheme.output_activations is None:
            _strip_quantization(module)
        else:
            module.quantization_scheme = scheme.model_copy(update={"weights": None})
        baked.append(name)
    if hasattr(model.config, "quantization_config") and all(
        getattr(m, "quantization_scheme", None) is None for m in model.modules()
    ):
        del model.config.quantization_config
    return baked


def pruning_expectation(model: "PreTrainedModel", params: "PruningParams") -> CompressionExpectation:
    """What an llm-compressor pruner promises: ``params``'s expectation, refusing (``NotLinearError``) targets
    that are not ``nn.Linear``, which its modifiers would silently leave dense (MoE experts)."""
    linear_layers(model, params.targets)
    return params.expectation(model)


def prune(
    model: "PreTrainedModel", params: "PruningParams", ctx: CompressionContext, modifier_cls: type, **options: object
) -> "PreTrainedModel":
    """Run an llm-compressor sparsity modifier (``WandaPruningModifier``, ``SparseGPTModifier``) on the
    layers ``params`` selects. Our ``N:M`` means N kept of M; llm-compressor's ``mask_structure`` counts
    the pruned ones, so "1:4" here is its "3:4" (2:4 and 4:8 read the same either way)."""
    expectation = pruning_expectation(model, params)
    if params.n_m is None:
        mask_structure = "0:0"
    else:
        n, m = params.n_m
        mask_structure = f"{m - n}:{m}"
    targets, ignore = linear_selection(model, expectation.targets)
    modifier = modifier_cls(
        sparsity=params.target_sparsity, mask_structure=mask_structure, targets=targets, ignore=ignore, **options
    )
    return run_oneshot(model, modifier, ctx)


class QuantParams(BaseModel):
    """Integer weight quantization through llm-compressor, shared by ``gptq`` and ``rtn``."""

    model_config = ConfigDict(extra="forbid")

    bits: Literal[4, 8] = Field(4, description="weight bit width: 4 or 8")
    group_size: int | None = Field(
        64,
        gt=0,
        description="weights per quantization group along the input dim; must divide every targeted layer's "
        "input width (SmolLM2: 576, so not 128); null = one scale per output channel",
    )
    symmetric: bool = Field(True, description="symmetric integer grid (no zero point), as llm-compressor's presets")
    targets: Targets = Field(default_factory=Targets, description="which Linear layers are quantized")

    def expectation(self, model: "PreTrainedModel") -> CompressionExpectation:
        """Promise: every target at most 2**bits distinct values per group; raises ``GroupSizeError``
        naming the first layer whose input width the group size does not divide."""
        layers = linear_layers(model, self.targets)
        check_group_size(layers, self.group_size)
        return CompressionExpectation(targets=list(layers), bits=self.bits, group_size=self.group_size)

    def weight_args(self):
        """compressed-tensors ``QuantizationArgs`` of the weights."""
        from compressed_tensors.quantization import QuantizationArgs

        strategy = "channel" if self.group_size is None else "group"
        return QuantizationArgs(
            num_bits=self.bits,
            type="int",
            symmetric=self.symmetric,
            strategy=strategy,
            group_size=self.group_size,
            dynamic=False,
        )


def quantization_modifier(
    modifier_cls: type,
    model: "PreTrainedModel",
    params: QuantParams,
    activation_bits: int | None = None,
    **options: object,
) -> "Modifier":
    """An llm-compressor quantization modifier (``QuantizationModifier``, ``GPTQModifier``) for the layers
    ``params`` selects: weights as ``params`` says, and optionally dynamic per-token symmetric integer input
    activations (W8A8 when both are 8 bits)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    targets, ignore = linear_selection(model, params.expectation(model).targets)
    inputs = (
        None
        if activation_bits is None
        else QuantizationArgs(num_bits=activation_bits, type="int", symmetric=True, strategy="token", dynamic=True)
    )
    scheme = QuantizationScheme(targets=targets, weights=params.weight_args(), input_activations=inputs)
    return modifier_cls(config_groups={"group_0": scheme}, ignore=ignore, **options)


def _strip_quantization(module: torch.nn.Module) -> None:
    """Remove compressed-tensors' quantization state from a module: the wrapped forward, the scheme and
    status, and every scale / zero-point / observer parameter, buffer or submodule it added."""
    module.__dict__.pop("forward", None)
    for attr in ("quantization_scheme", "quantization_status", "quantization_enabled"):
        if hasattr(module, attr):
            delattr(module, attr)
    prefixes = ("weight_", "input_", "output_")
    for collection in (module._parameters, module._buffers, module._modules):
        for key in [k for k in collection if k.startswith(prefixes)]:
            del collection[key]


def _scratch_dir(workdir: str | None) -> tempfile.TemporaryDirectory:
    """A temporary directory (inside ``workdir`` when given), removed on exit."""
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix="saex-llmcompressor-", dir=workdir)


class OneshotQuantizer:
    """What the llm-compressor quantization plugins share: run the modifier once over the calibration blocks,
    write the quantized values back into the weights, and promise what the params say. Subclasses give the
    modifier."""

    def modifier(self, model: "PreTrainedModel", params: QuantParams):
        raise NotImplementedError

    def compress(self, model: "PreTrainedModel", params: QuantParams, ctx: CompressionContext) -> "PreTrainedModel":
        run_oneshot(model, self.modifier(model, params), ctx)
        bake_quantized_weights(model)
        return model

    def expectation(self, model: "PreTrainedModel", params: QuantParams) -> CompressionExpectation:
        return params.expectation(model)
