"""Structured SAE pruning: drop whole latents, so the pruned SAE is really smaller (d_sae shrinks) and faster.

Each latent j gets a score on the calibration activations and the ``round((1 - sparsity) * d_sae)`` best are
kept, in their original order:

- ``frequency``: share of calibration tokens on which latent j fires;
- ``decoder_norm_x_activation``: ||W_dec[j]|| * ||f_j||, the norm over calibration tokens of latent j's
  contribution to the reconstructions.

Ties are broken by latent index (lowest kept). The kept latents keep their W_enc columns, b_enc entries, W_dec
rows and any other per-latent state (thresholds, dead-latent counters); b_dec, norm_scale and scalar state stay
as they are (``common.keep_latents``). A TopK SAE must keep at least k latents.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from pydantic import Field

from saex import SAE, ActivationSource, SAEPruner, hookimpl
from saex.plugins.pruning.common import (
    CalibrationParams,
    CalibrationStats,
    calibration_stats,
    check_latent_count,
    check_sparsity,
    keep_latents,
)

Score = Literal["frequency", "decoder_norm_x_activation"]


class LatentsParams(CalibrationParams):
    score: Score = Field("frequency", description="how latents are ranked: firing frequency or ||W_dec_j|| * ||f_j||")


def latent_scores(sae: SAE, stats: CalibrationStats, score: Score) -> torch.Tensor:
    """Score per latent [d_sae] (float64); higher = more worth keeping."""
    if score == "frequency":
        return stats.frequency
    return sae.W_dec.detach().double().norm(dim=-1).cpu() * stats.latent_norm


def kept_latents(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Indices (ascending) of the ``round((1 - sparsity) * d_sae)`` highest scores, ties to the lowest index."""
    n_keep = round((1.0 - sparsity) * len(scores))
    order = (-scores).argsort(stable=True)
    return order[:n_keep].sort().values


class LatentsPruner:
    name = "latents"
    description = "structured pruning: keep the top (1 - s) latents by firing frequency or decoder norm x activation"
    Params = LatentsParams

    def prune(self, sae: SAE, params: LatentsParams, calibration: ActivationSource, sparsity: float) -> SAE:
        sparsity = check_sparsity(sparsity)
        check_latent_count(sae, round((1.0 - sparsity) * sae.d_sae))  # before the calibration pass
        stats = calibration_stats(sae, calibration, params)
        return keep_latents(sae, kept_latents(latent_scores(sae, stats, params.score), sparsity))


@hookimpl
def register_sae_pruners(register: Callable[[SAEPruner], None]) -> None:
    register(LatentsPruner())
