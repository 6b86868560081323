"""Percentile-bootstrap confidence intervals over eval blocks, and paired differences between two SAEs scored on
the same tokens (docs/METRICS.md, "Uncertainty").

The tokens of one packed eval block share a document and a context, so they are correlated: resampling tokens
would understate the spread. A resample instead draws K of the K eval blocks with replacement. A metric adds
its per-token values to float64 sums per block (``BlockSums``), whatever its batches, so nothing depends on the
batch size; a ``Statistic`` maps block weights [resamples, K] (how often each block was drawn) to one value per
resample, and the interval is the (1 - confidence) / 2 and (1 + confidence) / 2 percentiles of those values.
A paired difference evaluates two SAEs' statistics on the same seeded draws, so shared token noise cancels.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field

from saex.plugin.protocols import MetricOutput

Statistic = Callable[[torch.Tensor], torch.Tensor]  # block weights [resamples, K] -> value per resample [resamples]

CI_LOW, CI_HIGH = "_ci_low", "_ci_high"
VS_ORIGINAL = "_vs_original"  # ``<key>_vs_original``: this SAE's value minus its original's, same tokens
BOOTSTRAP_AGGREGATION = "percentile bootstrap over eval blocks"


class BootstrapParams(BaseModel):
    """The parameters every metric with intervals takes (its ``Params`` subclasses this)."""

    model_config = ConfigDict(extra="forbid")

    resamples: int = Field(1000, gt=0, description="bootstrap resamples of the eval blocks")
    confidence: float = Field(0.95, gt=0, lt=1, description="confidence level of the intervals")
    seed: int = Field(0, description="seed of the resampling: the same seed gives the same intervals")


class BlockSums:
    """Float64 sums per eval block of named per-token quantities, kept on the CPU (``index_add_`` is
    deterministic there, so intervals are exactly reproducible)."""

    def __init__(self, n_blocks: int) -> None:
        self.n_blocks = n_blocks
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, name: str, values: torch.Tensor, blocks: torch.Tensor) -> None:
        """Add per-token ``values`` [tokens] or [tokens, d] to the sums of their ``blocks`` [tokens]."""
        values = values.detach().to(device="cpu", dtype=torch.float64)
        if name not in self.sums:
            self.sums[name] = torch.zeros((self.n_blocks, *values.shape[1:]), dtype=torch.float64)
        self.sums[name].index_add_(0, blocks.cpu(), values)

    def total(self, name: str, weights: torch.Tensor) -> torch.Tensor:
        """Weighted total of ``name`` per resample: weights [resamples, K] -> [resamples] or [resamples, d]."""
        return weights @ self.sums[name]


def point(statistic: Statistic, n_blocks: int) -> float:
    """The statistic on the blocks as they are (every weight 1)."""
    return float(statistic(torch.ones(1, n_blocks, dtype=torch.float64))[0])


class Bootstrap:
    """Seeded block resamples shared by every statistic of one metric call: the intervals of an SAE and of its
    original, and their difference, all use the same draws."""

    def __init__(self, n_blocks: int, params: BootstrapParams) -> None:
        if n_blocks < 1:
            raise ValueError("bootstrap intervals need at least one eval block")
        generator = torch.Generator().manual_seed(params.seed)
        draws = torch.randint(n_blocks, (params.resamples, n_blocks), generator=generator)
        self.weights = torch.zeros(params.resamples, n_blocks, dtype=torch.float64)
        self.weights.scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.float64))
        self.quantiles = torch.tensor([(1 - params.confidence) / 2, (1 + params.confidence) / 2], dtype=torch.float64)

    def interval(self, samples: torch.Tensor) -> tuple[float, float]:
        """Percentile interval of one statistic's resampled values (NaN if any resample is NaN)."""
        low, high = torch.quantile(samples, self.quantiles).tolist()
        return low, high

    def intervals(self, statistics: Mapping[str, Statistic]) -> dict[str, float]:
        """``<key>_ci_low`` and ``<key>_ci_high`` of every statistic."""
        found = {}
        for key, statistic in statistics.items():
            found[key + CI_LOW], found[key + CI_HIGH] = self.interval(statistic(self.weights))
        return found

    def differences(
        self,
        mine: Mapping[str, Statistic],
        original: Mapping[str, Statistic],
        points: Mapping[str, float],
        original_points: Mapping[str, float],
    ) -> dict[str, float]:
        """``<key>_vs_original`` = points - original_points for every key of ``mine``, with the interval of
        the difference resample by resample (an SAE against itself: exactly 0, zero width)."""
        found = {}
        for key, statistic in mine.items():
            name = key + VS_ORIGINAL
            found[name] = points[key] - original_points[key]
            samples = statistic(self.weights) - original[key](self.weights)
            found[name + CI_LOW], found[name + CI_HIGH] = self.interval(samples)
        return found


def _interval_outputs(output: MetricOutput) -> tuple[MetricOutput, ...]:
    """``output`` naming its interval keys, then their declarations."""
    low, high = output.name + CI_LOW, output.name + CI_HIGH
    ends = (
        MetricOutput(
            name=key,
            description=f"{end} end of the confidence interval of {output.name} (level: the metric's `confidence`)",
            aggregation=BOOTSTRAP_AGGREGATION,
            unit=output.unit,
            range=output.range,
        )
        for key, end in ((low, "lower"), (high, "upper"))
    )
    return (output.model_copy(update={"interval": (low, high)}), *ends)


def _difference_output(output: MetricOutput) -> MetricOutput:
    return MetricOutput(
        name=output.name + VS_ORIGINAL,
        description=f"{output.name} of this SAE minus that of its `original` SAE scored on the same model, hook "
        "and tokens",
        aggregation="paired difference on the same eval tokens",
        higher_is_better=output.higher_is_better,
        unit=output.unit,
        label=f"Δ{output.label or output.name}",
        difference_of=output.name,
        order=output.order,
    )


def with_uncertainty(
    outputs: tuple[MetricOutput, ...], intervals: Collection[str], differences: Collection[str]
) -> tuple[MetricOutput, ...]:
    """Declarations of a metric with intervals: ``outputs``, those named in ``intervals`` with their interval
    keys, then the paired difference (and its interval) of each key named in ``differences``."""
    declared = []
    for output in outputs:
        declared += _interval_outputs(output) if output.name in intervals else [output]
    by_name = {output.name: output for output in outputs}
    for name in differences:
        declared += _interval_outputs(_difference_output(by_name[name]))
    return tuple(declared)
