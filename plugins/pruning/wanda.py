"""Wanda pruning of an SAE (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language
Models"): score = |W| x the calibration norm of the input that W multiplies, compared within each output.

- ``W_enc`` [d_in, d_sae]: score[i, j] = |W_enc[i, j]| * ||x_i||, where x is the encoder input *as the SAE
  sees it*: the model activation times ``norm_scale``, minus ``b_dec`` (``common.encoder_input``), and the norm
  runs over calibration tokens. Compared within each column j (the weights producing latent j).
- ``W_dec`` [d_sae, d_in]: score[j, i] = |W_dec[j, i]| * ||f_j||, f the latent activations of the *unpruned*
  SAE on the calibration tokens (scaled units, what W_dec multiplies). Compared within each column i (the
  weights producing model dimension i).

Each column loses exactly ``round(sparsity * column length)`` weights. Both norms come from one streamed pass
with the original SAE (as Wanda gathers the inputs of all sublayers of a block before pruning any of them).
A latent that never fires has norm 0, so its decoder row scores 0 and is pruned first; the SAE code never
divides by decoder-row norms at inference, so such rows are harmless. Biases, thresholds and ``norm_scale``
stay as they are.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from pydantic import Field

from saex import SAE, ActivationSource, SAEPruner, hookimpl
from saex.plugins.pruning.common import (
    MATRICES,
    CalibrationParams,
    Matrix,
    calibration_stats,
    check_sparsity,
    prune_columns,
)


class WandaParams(CalibrationParams):
    matrices: list[Matrix] = Field(list(MATRICES), min_length=1, description="which of W_enc, W_dec are pruned")


def wanda_scores(sae: SAE, input_norm: torch.Tensor, latent_norm: torch.Tensor) -> dict[Matrix, torch.Tensor]:
    """|W| times the norm of each matrix's input, broadcast along that input's axis (rows for both)."""
    w_enc = sae.W_enc.detach().float().abs()
    w_dec = sae.W_dec.detach().float().abs()
    return {
        "W_enc": w_enc * input_norm.to(w_enc).unsqueeze(1),
        "W_dec": w_dec * latent_norm.to(w_dec).unsqueeze(1),
    }


class WandaPruner:
    name = "wanda"
    description = "Wanda pruning of W_enc and W_dec: |w| x calibration input norm, within each output column"
    Params = WandaParams

    def prune(self, sae: SAE, params: WandaParams, calibration: ActivationSource, sparsity: float) -> SAE:
        sparsity = check_sparsity(sparsity)
        stats = calibration_stats(sae, calibration, params)
        scores = wanda_scores(sae, stats.input_norm, stats.latent_norm)
        return prune_columns(sae, {name: scores[name] for name in dict.fromkeys(params.matrices)}, sparsity)


@hookimpl
def register_sae_pruners(register: Callable[[SAEPruner], None]) -> None:
    register(WandaPruner())
