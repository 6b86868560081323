"""Reconstruction and sparsity metrics of an SAE on eval activations (docs/METRICS.md).

Every statistic is pooled over all eval tokens (never averaged per batch) and accumulated in float64, so the
result does not depend on the batch size. The formulas match SAELens 6.54's evals; explained variance centres
each dimension on its own mean over all tokens (not SAEBench 0.6's scalar mean, not the per-batch "legacy" one).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from pydantic import BaseModel, PositiveInt

from saex import Metric, MetricContext, MetricOutput, hookimpl

DENSE_THRESHOLD = 0.1  # a latent firing on more than this share of tokens counts as dense
L2_RATIO_MIN_NORM = 1e-4  # inputs with a smaller norm are divided by 1 instead (as SAELens does)
PER_TOKEN = "mean over eval tokens"
PER_LATENT = "share of latents, density over eval tokens"
OUTPUTS = (
    MetricOutput(
        name="mse",
        description="squared reconstruction error ||x - x_hat||^2, summed over dimensions",
        aggregation=PER_TOKEN,
        higher_is_better=False,
        range=(0, None),
    ),
    MetricOutput(
        name="cos",
        description="cosine between x and its reconstruction",
        aggregation=PER_TOKEN,
        higher_is_better=True,
        range=(-1, 1),
    ),
    MetricOutput(
        name="l2_ratio",
        description="||x_hat|| / ||x||: 1 keeps the norm, below 1 shrinks it",
        aggregation=PER_TOKEN,
        range=(0, None),
    ),
    MetricOutput(
        name="explained_variance",
        description="1 - squared error / variance around the per-dimension mean (1: perfect, 0: the mean)",
        aggregation="pooled over eval tokens",
        higher_is_better=True,
        range=(None, 1),
        headline=True,
        gap=True,
        cost_quality=True,
        vs_sparsity=True,
        order=10,
    ),
    MetricOutput(
        name="l0",
        description="latents active per token",
        aggregation=PER_TOKEN,
        unit="latents",
        range=(0, None),
        headline=True,
        order=40,
    ),
    MetricOutput(name="l1", description="sum of |latent activations|", aggregation=PER_TOKEN, range=(0, None)),
    MetricOutput(
        name="dead_frac",
        description="latents that never fire on the eval tokens",
        aggregation=PER_LATENT,
        higher_is_better=False,
        range=(0, 1),
        headline=True,
        order=41,
    ),
    MetricOutput(
        name="dense_frac",
        description=f"latents firing on more than {DENSE_THRESHOLD:g} of the eval tokens",
        aggregation=PER_LATENT,
        higher_is_better=False,
        range=(0, 1),
        headline=True,
        order=42,
    ),
)
METRIC_KEYS = tuple(output.name for output in OUTPUTS)


class SAELike(Protocol):
    """What these metrics need from an SAE: ``forward(x) -> (x_hat, f)`` and the latent count."""

    d_sae: int

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class ReconstructionStats:
    """One-pass accumulator of the reconstruction metrics over batches of (x, x_hat, f).

    Call ``update`` once per batch, then ``result``. The per-dimension mean needed by explained variance is
    merged batch by batch (Chan et al.'s parallel variance update), which gives the same total as
    sum_d (S2_d - S1_d^2 / n) without its cancellation when means are large relative to the spread.
    """

    def __init__(self) -> None:
        self.n = 0
        self._sse: torch.Tensor | None = None  # sum_i ||x_i - x_hat_i||^2
        self._mean: torch.Tensor | None = None  # [d] running mean of x
        self._m2: torch.Tensor | None = None  # [d] running sum of squared deviations from the mean
        self._cos: torch.Tensor | None = None  # sum_i cos(x_i, x_hat_i)
        self._l2_ratio: torch.Tensor | None = None  # sum_i ||x_hat_i|| / ||x_i||
        self._l0: torch.Tensor | None = None  # sum_i #(f_i != 0)
        self._l1: torch.Tensor | None = None  # sum_i sum_j |f_ij|
        self._fired: torch.Tensor | None = None  # [d_sae] int64: tokens where latent j != 0

    def update(self, x: torch.Tensor, x_hat: torch.Tensor, f: torch.Tensor) -> None:
        """Add one batch: x and x_hat [b, d], f [b, d_sae], all on the same device."""
        if x.ndim != 2 or x_hat.shape != x.shape:
            raise ValueError(f"x and x_hat must both be [batch, d]; got {tuple(x.shape)} and {tuple(x_hat.shape)}")
        if f.ndim != 2 or f.shape[0] != x.shape[0]:
            raise ValueError(f"f must be [batch, d_sae] with batch {x.shape[0]}; got {tuple(f.shape)}")
        b = x.shape[0]
        if b == 0:
            return
        if self._mean is not None and (self._mean.shape[0] != x.shape[1] or self._fired.shape[0] != f.shape[1]):
            raise ValueError(
                f"batch widths (d={x.shape[1]}, d_sae={f.shape[1]}) differ from earlier batches "
                f"(d={self._mean.shape[0]}, d_sae={self._fired.shape[0]})"
            )
        x = x.detach().to(torch.float64)
        x_hat = x_hat.detach().to(torch.float64)
        f = f.detach().to(torch.float64)

        if self._mean is None:
            zero = torch.zeros((), dtype=torch.float64, device=x.device)
            self._sse, self._cos, self._l2_ratio, self._l0, self._l1 = (zero.clone() for _ in range(5))
            self._mean = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
            self._m2 = torch.zeros_like(self._mean)
            self._fired = torch.zeros(f.shape[1], dtype=torch.int64, device=x.device)

        self._sse += (x - x_hat).pow(2).sum()

        batch_mean = x.mean(dim=0)
        batch_m2 = (x - batch_mean).pow(2).sum(dim=0)
        n_total = self.n + b
        delta = batch_mean - self._mean
        self._mean += delta * (b / n_total)
        self._m2 += batch_m2 + delta.pow(2) * (self.n * b / n_total)
        self.n = n_total

        self._cos += F.cosine_similarity(x, x_hat, dim=-1).sum()
        norm_in = x.norm(dim=-1)
        norm_in = torch.where(norm_in < L2_RATIO_MIN_NORM, torch.ones_like(norm_in), norm_in)
        self._l2_ratio += (x_hat.norm(dim=-1) / norm_in).sum()

        active = f != 0
        self._l0 += active.sum()
        self._l1 += f.abs().sum()
        self._fired += active.sum(dim=0)

    def densities(self) -> torch.Tensor:
        """Share of tokens on which each latent is non-zero: float64 [d_sae] on CPU."""
        self._require_data()
        return self._fired.to(torch.float64).cpu() / self.n

    def result(self) -> dict[str, float]:
        """The metrics over every token seen so far, keyed as in ``METRIC_KEYS``."""
        self._require_data()
        n = self.n
        total_variance = self._m2.sum()
        density = self.densities()
        return {
            "mse": (self._sse / n).item(),
            "cos": (self._cos / n).item(),
            "l2_ratio": (self._l2_ratio / n).item(),
            "explained_variance": (1.0 - self._sse / total_variance).item(),
            "l0": (self._l0 / n).item(),
            "l1": (self._l1 / n).item(),
            "dead_frac": (density == 0).to(torch.float64).mean().item(),
            "dense_frac": (density > DENSE_THRESHOLD).to(torch.float64).mean().item(),
        }

    def _require_data(self) -> None:
        if self.n == 0:
            raise ValueError("no tokens were added: reconstruction metrics are undefined on zero tokens")


class ReconstructionParams(BaseModel):
    model_config = {"extra": "forbid"}

    batch_size: PositiveInt | None = None  # tokens per SAE forward; defaults to the context's batch size


class Reconstruction:
    """Metric plugin: mse, cos, l2_ratio, explained_variance, l0, l1, dead_frac, dense_frac."""

    name = "reconstruction"
    scope = "sae"
    description = "Reconstruction (mse, cos, l2_ratio, explained variance) and sparsity (l0, l1, dead/dense) of the SAE"
    Params = ReconstructionParams
    outputs = OUTPUTS

    def compute(self, ctx: MetricContext, params: BaseModel) -> dict[str, float]:
        if not isinstance(params, ReconstructionParams):
            raise TypeError(f"{self.name} expects {ReconstructionParams.__name__}, got {type(params).__name__}")
        return reconstruction_stats(ctx, params.batch_size or ctx.batch_size).result()


def reconstruction_stats(ctx: MetricContext, batch_size: int) -> ReconstructionStats:
    """Run ``ctx.sae`` over every eval token once and return the filled accumulator.

    The SAE must already sit on ``ctx.device``; batches are moved there.
    """
    source = ctx.eval_activations
    if source.n_tokens == 0:
        raise ValueError("the eval activation source holds zero tokens: nothing to score the SAE on")
    sae_d_in = getattr(ctx.sae, "d_in", None)
    if sae_d_in is not None and sae_d_in != source.d_in:
        raise ValueError(
            f"the SAE expects inputs of width d_in={sae_d_in}, the eval activations have width {source.d_in}"
        )
    sae: SAELike = ctx.sae
    stats = ReconstructionStats()
    with torch.no_grad():
        for batch in source.iter_batches(batch_size):
            x = batch.to(ctx.device)
            x_hat, f = sae(x)
            stats.update(x, x_hat, f)
    if stats.n == 0:
        raise ValueError("the eval activation source yielded zero tokens: nothing to score the SAE on")
    return stats


@hookimpl
def register_metrics(register: Callable[[Metric], None]) -> None:
    register(Reconstruction())
