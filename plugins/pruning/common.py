"""What the SAE pruners share: sparsity validation, per-output masks, one streamed pass of calibration
statistics, rebuilding an SAE with fewer latents, and measuring the sparsity a pruned SAE achieved.

Orientation, used by every strategy: ``W_enc`` is [d_in, d_sae] and its *outputs* are latents, so the
weights producing latent j are the column ``W_enc[:, j]``; ``W_dec`` is [d_sae, d_in] and its outputs are
model dimensions, so the weights producing dimension i are the column ``W_dec[:, i]``. Both matrices are
therefore compared *within each column* ("per output row" in the Wanda paper's [out, in] convention).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from saex import SAE, ActivationSource

Matrix = Literal["W_enc", "W_dec"]
MATRICES: tuple[Matrix, Matrix] = ("W_enc", "W_dec")


class CalibrationParams(BaseModel):
    """How a calibrated pruner reads its calibration activations."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(4096, gt=0, description="tokens per calibration batch (memory bound of the pass)")
    max_tokens: int | None = Field(None, gt=0, description="use at most this many calibration tokens; None = all")


def check_sparsity(sparsity: float) -> float:
    """``sparsity`` as a float in [0, 1); a ValueError users can act on otherwise."""
    value = float(sparsity)
    if not math.isfinite(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"SAE pruning sparsity must satisfy 0 <= sparsity < 1, got {sparsity!r}")
    return value


def smallest_per_column_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean mask (shape of ``scores`` [rows, cols]), True = prune: in every column exactly
    ``round(sparsity * rows)`` entries, those with the smallest score. Ties are broken by row index (lowest
    pruned first), so the mask is deterministic."""
    n_prune = round(sparsity * scores.shape[0])
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if n_prune > 0:
        order = scores.float().argsort(dim=0, stable=True)
        mask.scatter_(0, order[:n_prune], True)
    return mask


@torch.no_grad()
def prune_columns(sae: SAE, scores: dict[Matrix, torch.Tensor], sparsity: float) -> SAE:
    """A copy of ``sae`` with, for each matrix in ``scores``, the ``sparsity`` share of smallest-score weights
    of every column set to zero. Nothing else (biases, thresholds, norm_scale) changes."""
    pruned = copy.deepcopy(sae)
    for name, score in scores.items():
        weight: torch.Tensor = getattr(pruned, name)
        weight.masked_fill_(smallest_per_column_mask(score, sparsity), 0)
    return pruned


def encoder_input(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """What ``W_enc`` multiplies, for ``x`` in model units: ``sae.normalise(x) - b_dec`` (``x * norm_scale``, or
    per token layer-normed first for an SAE with ``layer_norm``).

    Every built-in architecture computes ``pre = (x_scaled - b_dec) @ W_enc + b_enc`` (SAELens's
    ``apply_b_dec_to_input``); an architecture that does not subtract ``b_dec`` says so with a class attribute
    ``apply_b_dec_to_input = False``.
    """
    scaled = sae.normalise(x)
    if getattr(sae, "apply_b_dec_to_input", True):
        scaled = scaled - sae.b_dec
    return scaled


@dataclass
class CalibrationStats:
    """Sums over calibration tokens (float64): ``input_sq`` [d_in] of the encoder input squared (see
    ``encoder_input``), ``latent_sq`` [d_sae] of the latent activations squared (scaled units, what ``W_dec``
    multiplies), ``fired`` [d_sae] counts of tokens where a latent is non-zero."""

    n_tokens: int
    input_sq: torch.Tensor
    latent_sq: torch.Tensor
    fired: torch.Tensor

    @property
    def input_norm(self) -> torch.Tensor:
        """||x_i|| over calibration tokens, per input dimension i."""
        return self.input_sq.sqrt()

    @property
    def latent_norm(self) -> torch.Tensor:
        """||f_j|| over calibration tokens, per latent j (0 for a latent that never fires)."""
        return self.latent_sq.sqrt()

    @property
    def frequency(self) -> torch.Tensor:
        """Share of calibration tokens on which each latent fires."""
        return self.fired.double() / self.n_tokens


@torch.no_grad()
def calibration_stats(sae: SAE, source: ActivationSource, params: CalibrationParams) -> CalibrationStats:
    """One streamed pass over ``source`` (in order, ``params.batch_size`` tokens at a time, at most
    ``params.max_tokens``); memory is one batch plus O(d_in + d_sae) accumulators."""
    if source.d_in != sae.d_in:
        raise ValueError(f"calibration activations have width {source.d_in} but the SAE expects d_in={sae.d_in}")
    device = sae.W_enc.device
    input_sq = torch.zeros(sae.d_in, dtype=torch.float64, device=device)
    latent_sq = torch.zeros(sae.d_sae, dtype=torch.float64, device=device)
    fired = torch.zeros(sae.d_sae, dtype=torch.long, device=device)
    n_tokens = 0
    was_training = sae.training
    sae.eval()
    try:
        for batch in source.iter_batches(params.batch_size):
            if params.max_tokens is not None:
                batch = batch[: params.max_tokens - n_tokens]
            if not len(batch):
                break
            x = batch.to(device=device, dtype=sae.W_enc.dtype)
            input_sq += encoder_input(sae, x).double().pow(2).sum(0)
            f = sae.encode(x)
            latent_sq += f.double().pow(2).sum(0)
            fired += (f != 0).sum(0)
            n_tokens += len(batch)
            if params.max_tokens is not None and n_tokens >= params.max_tokens:
                break
    finally:
        sae.train(was_training)
    if n_tokens == 0:
        raise ValueError("SAE pruning needs calibration activations, but the calibration source is empty")
    return CalibrationStats(n_tokens, input_sq.cpu(), latent_sq.cpu(), fired.cpu())


def check_latent_count(sae: SAE, n_keep: int) -> None:
    """Fail early when an SAE cannot keep only ``n_keep`` latents: none left, or fewer than a TopK SAE's k."""
    if n_keep < 1:
        raise ValueError(f"pruning would keep no latent of d_sae={sae.d_sae}; lower the sparsity")
    k = getattr(sae.params, "k", None)
    if isinstance(k, int) and k > n_keep:
        raise ValueError(
            f"{sae.name}: keeping {n_keep} of {sae.d_sae} latents leaves fewer than k={k}; "
            f"lower the sparsity to at most {1 - k / sae.d_sae:.4f}"
        )


@torch.no_grad()
def keep_latents(sae: SAE, keep: torch.Tensor) -> SAE:
    """A new SAE of the same class holding only the latents ``keep`` (indices, in the order given).

    The new SAE is built as ``type(sae)(d_in, params)`` with ``params.d_sae`` set to ``len(keep)``, so
    ``save_sae``/``load_sae`` round-trip it. Every parameter or buffer is copied; along each dimension whose
    size changed between the original and the fresh build (a per-latent dimension: ``W_enc`` columns,
    ``b_enc``, ``W_dec`` rows, JumpReLU thresholds, dead-latent counters, ...) only the kept latents are taken.
    Scalar or per-input state (``b_dec``, ``norm_scale``, a BatchTopK threshold) is copied as is.
    """
    keep = torch.as_tensor(keep, dtype=torch.long).flatten()
    new_d_sae = len(keep)
    check_latent_count(sae, new_d_sae)
    params = sae.params.model_copy(update={"d_sae": new_d_sae})
    try:
        pruned = type(sae)(sae.d_in, params)
    except ValueError as e:
        raise ValueError(f"{sae.name}: cannot build an SAE with d_sae={new_d_sae}: {e}") from e
    old_state, new_state = sae.state_dict(), pruned.state_dict()
    state: dict[str, torch.Tensor] = {}
    for name, tensor in old_state.items():
        target_shape = new_state[name].shape
        for dim, (old, new) in enumerate(zip(tensor.shape, target_shape)):
            if old != new:
                if old != sae.d_sae or new != new_d_sae:
                    raise ValueError(f"{name}: cannot shrink shape {tuple(tensor.shape)} to {tuple(target_shape)}")
                tensor = tensor.index_select(dim, keep.to(tensor.device))
        state[name] = tensor.clone()
    pruned.to(device=sae.W_enc.device, dtype=sae.W_enc.dtype)
    pruned.load_state_dict(state, strict=True)
    pruned.train(sae.training)
    return pruned
