"""Any llm-compressor recipe, given as YAML (a file or inline), run through ``oneshot`` on the calibration split:
a method developer tries SparseGPT + GPTQ, AWQ, SmoothQuant + W8A8 or an FP8 scheme without writing a plugin.

The run is the shared one of the built-in llm-compressor plugins (``llmcompressor_oneshot.run_oneshot``: config
saved for a model built from a config, tokenizer as processor, calibration in order, torch seeded), then the
quantized values are written into the weights. Every modifier with an ``ignore`` list also ignores
``re:.*lm_head``: the LM head stays as it is, as with every built-in method.

The expectation is read from the recipe, per layer, matched with llm-compressor's own matching: a pruning
modifier (SparseGPT, Wanda) promises its sparsity (when one number for all layers) and its N:M pattern on the
layers it prunes; a quantization modifier (QuantizationModifier, GPTQModifier, the one after AWQ) promises at
most ``2**bits`` distinct values per group on the layers its scheme targets. Quantizing after pruning rounds
further weights to zero, so the sparsity is then not promised, the N:M pattern still is: round-to-nearest keeps
it, while llm-compressor 0.14's GPTQ spreads rounding errors onto the pruned weights and breaks it (measured:
SparseGPT 2:4 then GPTQ fails verification in every layer). A recipe whose modifiers select no Linear layer
is an error; one that ran but left a layer as it was, or did less than it says, fails verification.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from saex import CompressionContext, CompressionExpectation, file_digest, hookimpl
from saex.plugins.compression.layer_promises import LayerPromise, fold, quantization_promises
from saex.plugins.compression.llmcompressor_oneshot import LM_HEAD_IGNORE, bake_quantized_weights, run_oneshot

if TYPE_CHECKING:
    from llmcompressor.modifiers import Modifier
    from llmcompressor.modifiers.pruning.sparsegpt.sgpt_base import SparsityModifierBase
    from transformers import PreTrainedModel


class RecipeError(ValueError):
    """A recipe that saex cannot run or verify."""


class Recipe:
    name = "recipe"
    description = "any llm-compressor recipe (YAML file or inline) through oneshot; verified layer by layer"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        path: str | None = Field(None, description="a recipe file (YAML or JSON, e.g. llm-compressor's recipe.yaml)")
        recipe: str | None = Field(None, description="the recipe itself as YAML text (instead of path)")
        fingerprint: str | None = Field(
            None,
            description="hash of the recipe file, filled in when the registry is read (so an edited file "
            "recomputes); give it to pin the file's content",
        )

        @model_validator(mode="after")
        def _one_readable_recipe(self) -> "Recipe.Params":
            if (self.path is None) == (self.recipe is None):
                raise ValueError("give the recipe as exactly one of `path` (a file) or `recipe` (YAML text)")
            if self.path is not None:
                file = Path(self.path).expanduser()
                if not file.is_file():
                    raise ValueError(f"recipe file {file} does not exist")
                found = file_digest(file)[:16]
                if self.fingerprint is not None and self.fingerprint != found:
                    raise ValueError(
                        f"recipe file {file} has fingerprint {found}, the registry pins {self.fingerprint}"
                    )
                self.fingerprint = found
            elif self.fingerprint is not None:
                raise ValueError("`fingerprint` pins a recipe file; an inline recipe is its own identity")
            check_recipe(self.text())
            return self

        def text(self) -> str:
            """The recipe; raises ``RecipeError`` when its file changed since the params were validated."""
            if self.recipe is not None:
                return self.recipe
            file = Path(self.path).expanduser()
            if file_digest(file)[:16] != self.fingerprint:
                raise RecipeError(f"recipe file {file} changed since the registry was read (fingerprint differs)")
            return file.read_text()

    def compress(self, model: "PreTrainedModel", params: Params, ctx: CompressionContext) -> "PreTrainedModel":
        modifiers = build_modifiers(params.text())
        check_runs_here(modifiers)
        run_oneshot(model, modifiers, ctx)
        bake_quantized_weights(model)
        return model

    def expectation(self, model: "PreTrainedModel", params: Params) -> CompressionExpectation:
        from llmcompressor.modifiers.pruning.sparsegpt.sgpt_base import SparsityModifierBase
        from llmcompressor.modifiers.quantization import QuantizationMixin

        modifiers = build_modifiers(params.text())
        promises: dict[str, LayerPromise] = {}
        widths = []
        for modifier in modifiers:
            if isinstance(modifier, SparsityModifierBase):
                n_m = kept_of(modifier.mask_structure)
                for name, layer, sparsity in pruned_layers(model, modifier):
                    if n_m is not None:  # an N:M mask decides the sparsity, whatever `sparsity` says
                        sparsity = 1 - n_m[0] / n_m[1]
                    promises[name] = LayerPromise(sparsity=sparsity, n_m=n_m or promises.get(name, LayerPromise()).n_m)
                    widths.append(layer.in_features)
            elif isinstance(modifier, QuantizationMixin):
                for name, promise in quantization_promises(model, modifier.resolved_config).items():
                    promises[name] = replace(promise, n_m=promises.get(name, LayerPromise()).n_m)
        if not promises:
            raise RecipeError(
                f"the recipe's modifiers {[type(m).__name__ for m in modifiers]} prune or quantize no Linear layer "
                "of this model (check their targets and ignore lists): there would be nothing to verify"
            )
        # Wanda and SparseGPT zero int(in_features * sparsity) weights per row: up to one weight per row short
        return fold(promises, tolerance=max([0.01, *(1 / width for width in widths)]))


def modifier_entries(data: object) -> list[tuple[str, dict]]:
    """(modifier name, its arguments) of a parsed recipe, in the order llm-compressor builds them:
    ``<name>_stage: {<group>_modifiers: {ModifierName: {arguments}}}``."""
    stages = data.items() if isinstance(data, dict) else []
    return [
        (name, args)
        for stage, groups in stages
        if isinstance(stage, str) and stage.endswith("_stage") and isinstance(groups, dict)
        for group, modifiers in groups.items()
        if isinstance(group, str) and group.endswith("_modifiers") and isinstance(modifiers, dict)
        for name, args in modifiers.items()
    ]


def check_recipe(text: str) -> None:
    """Raise ``ValueError`` unless ``text`` is YAML holding at least one modifier (checked without importing
    llm-compressor, which takes seconds: unknown modifier names surface when the compression runs)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"the recipe is not valid YAML: {err}") from None
    entries = modifier_entries(data)
    bare = [name for name, args in entries if not isinstance(args, dict)]
    if bare:
        raise ValueError(f"the arguments of {bare} must be a mapping (write `{bare[0]}: {{}}` for none)")
    if not entries:
        raise ValueError(
            "the recipe has no modifiers; llm-compressor reads "
            "`<name>_stage: {<group>_modifiers: {ModifierName: {arguments}}}`, e.g. "
            "`sparsity_stage: {sparsity_modifiers: {SparseGPTModifier: {sparsity: 0.5}}}`"
        )


def build_modifiers(text: str) -> list["Modifier"]:
    """Fresh llm-compressor modifiers of the recipe (they keep state, so one list per run), each with an
    ``ignore`` field also ignoring the LM head. The entry is added to the recipe before the modifiers are
    built, since quantization modifiers resolve their config while being validated."""
    from llmcompressor.recipe import Recipe as LlmcRecipe

    data = yaml.safe_load(text)
    entries = [args for _, args in modifier_entries(data)]
    for args, modifier in zip(entries, LlmcRecipe.from_dict(data).modifiers):
        ignore = list(args.get("ignore") or [])
        if "ignore" in type(modifier).model_fields and LM_HEAD_IGNORE not in ignore:
            args["ignore"] = [*ignore, LM_HEAD_IGNORE]
    return LlmcRecipe.from_dict(data).modifiers


def check_runs_here(modifiers: list["Modifier"]) -> None:
    """Raise ``RecipeError`` for a modifier that cannot run on this machine, before any work: llm-compressor
    0.14's AWQ pins its cached activations (``Tensor.pin_memory``), which needs an accelerator."""
    from llmcompressor.modifiers.transform import AWQModifier

    if not torch.accelerator.is_available() and any(isinstance(m, AWQModifier) for m in modifiers):
        raise RecipeError(
            "AWQModifier cannot run without an accelerator: llm-compressor 0.14 pins its cached activations in "
            "page-locked memory (Tensor.pin_memory), which fails on a CPU-only machine"
        )


def pruned_layers(model: nn.Module, modifier: "SparsityModifierBase") -> Iterator[tuple[str, nn.Linear, float | None]]:
    """The Linear layers a pruning modifier prunes, with each one's sparsity when the recipe fixes it (one
    number, or one per target in a list; an OWL profile picks them while it runs), selected as its
    ``on_calibration_start`` selects them: Linear modules inside its targets, minus its ignore list."""
    from compressed_tensors.utils import match_named_modules, match_targets

    sparsity = modifier.sparsity
    for index, (target_name, target) in enumerate(match_named_modules(model, modifier.targets)):
        if modifier.sparsity_profile is not None or sparsity is None:
            layer_sparsity = None
        else:
            layer_sparsity = float(sparsity[index] if isinstance(sparsity, list) else sparsity)
        for name, module in match_named_modules(target, ["Linear"]):
            qualified = f"{target_name}.{name}"  # "x." when the target is the Linear itself, as the modifier sees it
            if isinstance(module, nn.Linear) and not match_targets(qualified, module, modifier.ignore):
                yield qualified.rstrip("."), module, layer_sparsity


def kept_of(mask_structure: str) -> tuple[int, int] | None:
    """llm-compressor's ``mask_structure`` ("N:M", N pruned of every M; "0:0" unstructured) as saex's N:M
    (N kept of every M)."""
    pruned, m = (int(x) for x in mask_structure.split(":"))
    return None if m == 0 else (m - pruned, m)


@hookimpl
def register_compressors(register):
    register(Recipe())
