"""Reconstruction and sparsity metrics of an SAE on eval activations (docs/METRICS.md).

Every statistic is pooled over all eval tokens (never averaged per batch) and accumulated in float64, so the
result does not depend on the batch size. The formulas match SAELens 6.54's evals; explained variance centres
each dimension on its own mean over all tokens (not SAEBench 0.6's scalar mean, not the per-batch "legacy" one).

Beyond SAELens: explained variance, MSE and cosine over the *typical* tokens (norm below ``massive_norm_multiple``
times the median token norm) with the massive-activation tokens' share and own explained variance, since a
handful of huge vectors can carry most of the variance (docs/QUALITY.md); and percentile-bootstrap intervals
over eval blocks, and paired differences against the ``original`` SAE on the same tokens (``saex.analysis.bootstrap``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field, PositiveInt

from saex import (
    BlockSums,
    Bootstrap,
    BootstrapParams,
    Metric,
    MetricContext,
    MetricOutput,
    Statistic,
    hookimpl,
    with_uncertainty,
)

DENSE_THRESHOLD = 0.1  # a latent firing on more than this share of tokens counts as dense
L2_RATIO_MIN_NORM = 1e-4  # inputs with a smaller norm are divided by 1 instead (as SAELens does)
PER_TOKEN = "mean over eval tokens"
PER_LATENT = "share of latents, density over eval tokens"
MASSIVE_NORM_MULTIPLE = 10.0  # default: QUALITY.md's SmolLM2 layer 15 has 0.04% of tokens above 10x the median
TYPICAL = "mean over typical eval tokens (norm below massive_norm_multiple x the median norm)"
# SAEs compared at L0s further apart than this factor are flagged by the report (saex.report.comparisons): quality rises
# with L0, so a wider gap mixes sparsity into the quality difference read; 1.25 passes the drift of matched
# SAEs (JumpReLU ~31 against TopK's 32) and flags what the paper compared (L0 ~1,200 against 32)
L0_MATCH_FACTOR = 1.25
STATS_OUTPUTS = (
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
        match_factor=L0_MATCH_FACTOR,
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
METRIC_KEYS = tuple(output.name for output in STATS_OUTPUTS)  # what ``ReconstructionStats.result`` returns
TYPICAL_OUTPUTS = (
    MetricOutput(
        name="explained_variance_typical",
        description="explained_variance over the typical tokens only, around their own per-dimension mean",
        aggregation="pooled over typical eval tokens (norm below massive_norm_multiple x the median norm)",
        higher_is_better=True,
        range=(None, 1),
        headline=True,
        order=11,
    ),
    MetricOutput(
        name="mse_typical",
        description="mse over the typical tokens only",
        aggregation=TYPICAL,
        higher_is_better=False,
        range=(0, None),
    ),
    MetricOutput(
        name="cos_typical",
        description="cos over the typical tokens only",
        aggregation=TYPICAL,
        higher_is_better=True,
        range=(-1, 1),
    ),
    MetricOutput(
        name="massive_share",
        description="share of eval tokens whose norm is at least massive_norm_multiple x the median norm",
        aggregation="share of eval tokens",
        range=(0, 1),
    ),
    MetricOutput(
        name="explained_variance_massive",
        description="explained_variance over the massive tokens only, around their own mean (NaN below 2 tokens)",
        aggregation="pooled over massive eval tokens",
        higher_is_better=True,
        range=(None, 1),
    ),
    MetricOutput(
        name="massive_norm_threshold",
        description="the norm from which a token counts as massive: massive_norm_multiple x the median token norm",
        aggregation="multiple of the median over eval tokens",
        range=(0, None),
    ),
)
TYPICAL_KEYS = tuple(output.name for output in TYPICAL_OUTPUTS)
BOOTSTRAPPED = ("explained_variance", "mse", "cos", "l0")  # keys with intervals and paired differences
OUTPUTS = with_uncertainty(STATS_OUTPUTS + TYPICAL_OUTPUTS, BOOTSTRAPPED, BOOTSTRAPPED)


class ReconstructionStats:
    """One-pass accumulator of the reconstruction metrics over batches of (x, x_hat, f).

    Call ``update`` once per batch, then ``result``. The per-dimension mean needed by explained variance is
    merged batch by batch (Chan et al.'s parallel variance update), which gives the same total as
    sum_d (S2_d - S1_d^2 / n) without its cancellation when means are large relative to the spread.
    With ``n_blocks``, ``update`` also takes each row's eval block and ``statistics`` gives the bootstrap
    statistics of ``BOOTSTRAPPED`` from per-block sums.
    """

    def __init__(self, n_blocks: int | None = None) -> None:
        self.n = 0
        self._blocks = BlockSums(n_blocks) if n_blocks else None
        self._shift: torch.Tensor | None = None  # [d] first batch's mean: centres the per-block sums of x
        self._sse: torch.Tensor | None = None  # sum_i ||x_i - x_hat_i||^2
        self._mean: torch.Tensor | None = None  # [d] running mean of x
        self._m2: torch.Tensor | None = None  # [d] running sum of squared deviations from the mean
        self._cos: torch.Tensor | None = None  # sum_i cos(x_i, x_hat_i)
        self._l2_ratio: torch.Tensor | None = None  # sum_i ||x_hat_i|| / ||x_i||
        self._l0: torch.Tensor | None = None  # sum_i #(f_i != 0)
        self._l1: torch.Tensor | None = None  # sum_i sum_j |f_ij|
        self._fired: torch.Tensor | None = None  # [d_sae] int64: tokens where latent j != 0

    def update(self, x: torch.Tensor, x_hat: torch.Tensor, f: torch.Tensor, blocks: torch.Tensor | None = None) -> None:
        """Add one batch: x and x_hat [b, d], f [b, d_sae], all on the same device; ``blocks`` [b]: each row's
        eval block (required exactly when the accumulator was built with ``n_blocks``)."""
        if (blocks is None) != (self._blocks is None):
            raise ValueError("pass each row's eval block exactly when the accumulator was built with n_blocks")
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
        f = f.detach().float()  # [b, d_sae]: only counted and summed per row (float32 already: no copy)

        if self._mean is None:
            zero = torch.zeros((), dtype=torch.float64, device=x.device)
            self._sse, self._cos, self._l2_ratio, self._l0, self._l1 = (zero.clone() for _ in range(5))
            self._mean = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
            self._m2 = torch.zeros_like(self._mean)
            self._fired = torch.zeros(f.shape[1], dtype=torch.int64, device=x.device)

        error = (x - x_hat).pow(2)
        self._sse += error.sum()

        batch_mean = x.mean(dim=0)
        batch_m2 = (x - batch_mean).pow(2).sum(dim=0)
        n_total = self.n + b
        delta = batch_mean - self._mean
        self._mean += delta * (b / n_total)
        self._m2 += batch_m2 + delta.pow(2) * (self.n * b / n_total)
        self.n = n_total

        cos = F.cosine_similarity(x, x_hat, dim=-1)
        self._cos += cos.sum()
        norm_in = x.norm(dim=-1)
        norm_in = torch.where(norm_in < L2_RATIO_MIN_NORM, torch.ones_like(norm_in), norm_in)
        self._l2_ratio += (x_hat.norm(dim=-1) / norm_in).sum()

        # counts as float32 (exact: a row has < 2^24 latents, a batch < 2^24 rows), totals in float64; a bool or
        # uint8 .sum() to int64, or a float32 .sum(dtype=float64), takes a slow widening path on CPU (10x slower)
        active = (f != 0).to(torch.float32)
        per_row = active.sum(dim=-1)
        self._l0 += per_row.double().sum()
        self._l1 += f.abs().sum(dim=-1).double().sum()
        self._fired += active.sum(dim=0).to(torch.int64)
        if blocks is not None:
            self._add_blocks(x, error.sum(dim=-1), cos, per_row, blocks)

    def _add_blocks(
        self, x: torch.Tensor, error: torch.Tensor, cos: torch.Tensor, l0: torch.Tensor, blocks: torch.Tensor
    ) -> None:
        """Per-block sums of the per-row values; x is summed as x - shift so that the variance of a resample,
        s2 - ||s1||^2 / n, does not cancel when activation means dwarf their spread."""
        assert self._blocks is not None
        if self._shift is None:
            self._shift = x.mean(dim=0)
        centred = x - self._shift
        for name, values in (
            ("n", torch.ones_like(error)),
            ("sse", error),
            ("cos", cos),
            ("l0", l0),
            ("s1", centred),
            ("s2", centred.pow(2).sum(dim=-1)),
        ):
            self._blocks.add(name, values, blocks)

    def statistics(self) -> dict[str, Statistic]:
        """The bootstrap statistics of ``BOOTSTRAPPED``: block weights [resamples, K] -> values [resamples]."""
        if self._blocks is None:
            raise ValueError("bootstrap statistics need the accumulator built with n_blocks")
        sums = self._blocks

        def mean(name: str) -> Statistic:
            return lambda w: sums.total(name, w) / sums.total("n", w)

        def explained_variance(w: torch.Tensor) -> torch.Tensor:
            n, s1 = sums.total("n", w), sums.total("s1", w)
            return 1 - sums.total("sse", w) / (sums.total("s2", w) - s1.pow(2).sum(dim=-1) / n)

        return {"explained_variance": explained_variance, "mse": mean("sse"), "cos": mean("cos"), "l0": mean("l0")}

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


class ReconstructionParams(BootstrapParams):
    batch_size: PositiveInt | None = None  # tokens per SAE forward; defaults to the context's batch size
    massive_norm_multiple: float = Field(
        MASSIVE_NORM_MULTIPLE, gt=0, description="tokens with norm >= this x the median norm count as massive"
    )


class Reconstruction:
    """Metric plugin: mse, cos, l2_ratio, explained_variance, l0, l1, dead_frac, dense_frac, their typical-token
    versions, and bootstrap intervals and paired differences of ``BOOTSTRAPPED``."""

    name = "reconstruction"
    scope = "sae"
    description = "Reconstruction (mse, cos, l2_ratio, explained variance) and sparsity (l0, l1, dead/dense) of the SAE"
    Params = ReconstructionParams
    outputs = OUTPUTS

    def compute(self, ctx: MetricContext, params: BaseModel) -> dict[str, float]:
        if not isinstance(params, ReconstructionParams):
            raise TypeError(f"{self.name} expects {ReconstructionParams.__name__}, got {type(params).__name__}")
        return reconstruction(ctx, params)


def _checked_source(ctx: MetricContext) -> int:
    """The number of eval blocks (0 without ``ctx.eval_blocks``), once the source is known to fit the SAE."""
    source = ctx.eval_activations
    if source.n_tokens == 0:
        raise ValueError("the eval activation source holds zero tokens: nothing to score the SAE on")
    sae_d_in = getattr(ctx.sae, "d_in", None)
    if sae_d_in is not None and sae_d_in != source.d_in:
        raise ValueError(
            f"the SAE expects inputs of width d_in={sae_d_in}, the eval activations have width {source.d_in}"
        )
    if ctx.eval_blocks is None:
        return 0
    if ctx.eval_blocks.shape != (source.n_tokens,):
        raise ValueError(
            f"eval_blocks must name the block of each of the {source.n_tokens} eval rows; got shape "
            f"{tuple(ctx.eval_blocks.shape)}"
        )
    return int(ctx.eval_blocks.max()) + 1


def _subset(stats: ReconstructionStats, keys: dict[str, str]) -> dict[str, float]:
    """``keys`` (key returned -> key of ``result``) over a subset of tokens; NaN where undefined (no tokens,
    no variance)."""
    found = stats.result() if stats.n else {}
    values = {mine: found.get(theirs, math.nan) for mine, theirs in keys.items()}
    return {key: value if math.isfinite(value) else math.nan for key, value in values.items()}


def reconstruction(ctx: MetricContext, params: ReconstructionParams) -> dict[str, float]:
    """Every key of ``OUTPUTS`` ``ctx`` allows (intervals need ``ctx.eval_blocks``, differences also
    ``ctx.reference_sae``), from one norm pass over the eval activations and one pass per SAE.

    The SAEs must already sit on ``ctx.device``; batches are moved there. Rows are read in order, so row i of a
    batch is eval row ``start + i`` whatever the batch size.
    """
    n_blocks = _checked_source(ctx)
    source, batch_size = ctx.eval_activations, params.batch_size or ctx.batch_size
    parts = [batch.to(torch.float64).norm(dim=-1) for batch in source.iter_batches(batch_size)]
    if not parts:
        raise ValueError("the eval activation source yielded zero tokens: nothing to score the SAE on")
    norms = torch.cat(parts)
    threshold = params.massive_norm_multiple * float(norms.median())  # torch: the lower median if n is even
    is_typical = norms < threshold
    stats, typical, massive = ReconstructionStats(n_blocks), ReconstructionStats(), ReconstructionStats()
    original = ReconstructionStats(n_blocks) if ctx.reference_sae is not None and n_blocks else None
    with torch.no_grad():
        start = 0
        for batch in source.iter_batches(batch_size):
            rows = slice(start, start + len(batch))
            start += len(batch)
            x = batch.to(ctx.device)
            blocks = ctx.eval_blocks[rows] if n_blocks else None
            x_hat, f = ctx.sae(x)
            stats.update(x, x_hat, f, blocks)
            keep = is_typical[rows].to(x.device)
            typical.update(x[keep], x_hat[keep], f[keep])
            massive.update(x[~keep], x_hat[~keep], f[~keep])
            if original is not None:
                original.update(x, *ctx.reference_sae(x), blocks)
    found = stats.result()
    found |= _subset(typical, {f"{key}_typical": key for key in ("explained_variance", "mse", "cos")})
    found |= _subset(massive, {"explained_variance_massive": "explained_variance"})
    found |= {"massive_share": massive.n / stats.n, "massive_norm_threshold": threshold}
    if not n_blocks:
        return found
    bootstrap = Bootstrap(n_blocks, params)
    mine = stats.statistics()
    found |= bootstrap.intervals(mine)
    if original is not None:
        theirs = original.result()
        found |= bootstrap.differences(mine, original.statistics(), found, theirs)
    return found


@hookimpl
def register_metrics(register: Callable[[Metric], None]) -> None:
    register(Reconstruction())
