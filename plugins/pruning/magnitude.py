"""Magnitude pruning of an SAE: data-free, unstructured, per output.

In each pruned matrix, every column (the weights producing one output: a latent for ``W_enc`` [d_in, d_sae],
a model dimension for ``W_dec`` [d_sae, d_in]) loses exactly ``round(sparsity * column length)`` weights,
those with the smallest |w|. Biases, thresholds and ``norm_scale`` stay as they are; decoder rows are not
renormalised. The calibration source is not read.
"""

from __future__ import annotations

from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, Field

from saex import SAE, ActivationSource, SAEPruner, hookimpl
from saex.plugins.pruning.common import MATRICES, Matrix, check_sparsity, prune_columns


class MagnitudeParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    matrices: list[Matrix] = Field(list(MATRICES), min_length=1, description="which of W_enc, W_dec are pruned")


class MagnitudePruner:
    name = "magnitude"
    description = "unstructured magnitude pruning of W_enc and W_dec: smallest |w| within each output column"
    Params = MagnitudeParams

    def prune(self, sae: SAE, params: MagnitudeParams, calibration: ActivationSource, sparsity: float) -> SAE:
        sparsity = check_sparsity(sparsity)
        scores = {name: getattr(sae, name).detach().abs() for name in dict.fromkeys(params.matrices)}
        return prune_columns(sae, scores, sparsity)


@hookimpl
def register_sae_pruners(register: Callable[[SAEPruner], None]) -> None:
    register(MagnitudePruner())
