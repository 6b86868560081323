"""Downstream metrics by splicing: CE and KL with the SAE's reconstruction in place of the activation.

Pooled means over all eval tokens, as SAELens 6.54's ``get_downstream_reconstruction_metrics``:
ce_clean, ce_sae, ce_ablated per next-token prediction (predictions made from a special token dropped) and
ce_loss_score = (ce_ablated - ce_sae) / (ce_ablated - ce_clean);
kl_sae, kl_ablated with KL(p_clean || p_modified) from log_softmax at every non-special position (the last
one of a block included: it has a distribution, if no target), and kl_div_score = (kl_ablated - kl_sae) / kl_ablated.
The SAE replaces the activation at non-special positions; the zero-ablation at every position (as SAELens
does) or, with ``ablate_at: sae``, at the SAE's positions only, where a zero SAE scores exactly 0.
Zero-ablating a residual-stream hook of a bias-free model makes every later layer see zeros, so
ce_ablated = ln(vocab) there whatever the model. When the context has the hook's mean activation, a
mean-ablation baseline (the mean at the SAE's positions) gives ce_mean_ablated, kl_mean_ablated and the
scores ce_loss_score_mean, kl_div_score_mean against it: an informative baseline where zero-ablation is not.
Every mean is kept as float64 sums per eval block, for percentile-bootstrap intervals over the blocks and paired
differences against each SAE's ``original`` on the same blocks (``saex.analysis.bootstrap``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field
from tqdm import tqdm

from saex import (
    BlockSums,
    Bootstrap,
    BootstrapParams,
    MetricOutput,
    SpliceContext,
    Statistic,
    hookimpl,
    point,
    sae_transform,
    special_mask,
    suffix_logits,
    with_uncertainty,
    zero_ablation,
)


class _Pooled:
    """Float64 sums per eval block of per-token CE and KL for one variant, and its pooled means for any block
    weights [resamples, K] (all ones: the blocks as they are)."""

    def __init__(self, n_blocks: int) -> None:
        self.sums = BlockSums(n_blocks)

    def add(self, ce: torch.Tensor, kl: torch.Tensor, batch: _Batch) -> None:
        for name, values, rows in (("ce", ce, batch.ce_blocks), ("kl", kl, batch.kl_blocks)):
            self.sums.add(name, values, rows)
            self.sums.add(f"n_{name}", torch.ones_like(values), rows)

    def mean_ce(self, weights: torch.Tensor) -> torch.Tensor:
        return self.sums.total("ce", weights) / self.sums.total("n_ce", weights)

    def mean_kl(self, weights: torch.Tensor) -> torch.Tensor:
        return self.sums.total("kl", weights) / self.sums.total("n_kl", weights)

    def count(self, name: str) -> float:
        """Tokens ``name`` ("ce" or "kl") is pooled over."""
        return float(self.sums.sums[f"n_{name}"].sum())


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products of [n, v] tensors, as a batched matmul (3x faster than ``linalg.vecdot`` on CPU)."""
    return torch.einsum("nv,nv->n", a, b)


class _Batch:
    """One batch of eval blocks and its clean run, which every variant is compared with. Log-probabilities are
    taken at every position of the batch, [batch * seq, vocab], and the per-token losses picked out afterwards:
    no [tokens, vocab] copy per variant. KL(p || q) = sum p log p - sum p log q (clamped at 0), the first term
    once per batch."""

    def __init__(self, ids: torch.Tensor, first_block: int, tokenizer) -> None:
        scored = ~special_mask(ids, tokenizer)
        predicts = scored.clone()
        predicts[:, -1] = False
        self.scored = scored
        self.rows = scored.flatten().nonzero().squeeze(1)  # positions with a distribution (KL)
        self.predict_rows = predicts.flatten().nonzero().squeeze(1)  # ... and a next token (CE)
        self.targets = ids.roll(-1, dims=1).flatten()[self.predict_rows]
        blocks = (first_block + torch.arange(len(ids), device=ids.device)).unsqueeze(1).expand(ids.shape).flatten()
        self.ce_blocks, self.kl_blocks = blocks[self.predict_rows].cpu(), blocks[self.rows].cpu()
        self.clean_p: torch.Tensor | None = None
        self.clean_negentropy: torch.Tensor | None = None

    def set_clean(self, logp: torch.Tensor, scratch: _Scratch) -> None:
        self.clean_p = torch.exp(logp, out=scratch.get("clean_p", logp.shape, logp.device))
        self.clean_negentropy = _row_dot(self.clean_p, logp)

    def losses(self, logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token CE at the predicting positions and KL(clean || this) at the scored ones, for ``logp``
        [batch * seq, vocab] of one variant (the clean one included: its KL is exactly 0)."""
        assert self.clean_p is not None and self.clean_negentropy is not None
        ce = -logp[self.predict_rows, self.targets]
        # KL >= 0 exactly; the difference of two sums of ~entropy size leaves rounding of either sign (~1e-7)
        kl = (self.clean_negentropy - _row_dot(self.clean_p, logp))[self.rows].clamp_min_(0.0)
        return ce, kl


class _Scratch:
    """[tokens, vocab] float32 buffers reused across batches and variants: a fresh 100-200 MB tensor per variant
    costs more in page faults than the log-softmax written into it (3x on a 2-core CPU)."""

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: torch.Size, device: torch.device) -> torch.Tensor:
        buffer = self.buffers.get(name)
        if buffer is None or len(buffer) < shape[0] or buffer.shape[1:] != shape[1:] or buffer.device != device:
            buffer = self.buffers[name] = torch.empty(shape, device=device)
        return buffer[: shape[0]]


def _score(worse: torch.Tensor, better: torch.Tensor, best: torch.Tensor | float) -> torch.Tensor:
    """(worse - better) / (worse - best), NaN where the baseline does not move the loss."""
    denominator = worse - best
    return torch.where(denominator != 0, (worse - better) / denominator, math.nan)


PER_TOKEN = "mean over eval tokens"
NATS = "nats"
POOLED_RATIO = "ratio of means pooled over eval tokens"


@dataclass(frozen=True)
class _Baseline:
    """A baseline the SAE is scored against: the loss with ``variant`` in place of the activation is keyed
    ``ce_{variant}`` / ``kl_{variant}``, the SAE's scores ``ce_loss_score{suffix}`` / ``kl_div_score{suffix}``.
    ``plotted``: its scores are the ones the report's figures show; ``note`` is the caveat of its CE score."""

    variant: str
    suffix: str
    replaced_by: str
    plotted: bool
    note: str | None = None

    def scores(self, baseline: _Pooled, sae: _Pooled, clean: _Pooled) -> dict[str, Statistic]:
        return {
            f"ce_{self.variant}": baseline.mean_ce,
            f"kl_{self.variant}": baseline.mean_kl,
            f"ce_loss_score{self.suffix}": lambda w: _score(baseline.mean_ce(w), sae.mean_ce(w), clean.mean_ce(w)),
            f"kl_div_score{self.suffix}": lambda w: _score(baseline.mean_kl(w), sae.mean_kl(w), 0.0),
        }

    def outputs(self, rank: int) -> tuple[MetricOutput, ...]:
        """Declarations of the keys of ``scores``; ``rank`` orders this baseline's scores among the others'."""
        by = f"with the hook's activation replaced by {self.replaced_by}"
        return (
            MetricOutput(
                name=f"ce_{self.variant}",
                description=f"next-token cross-entropy {by}",
                aggregation=PER_TOKEN,
                unit=NATS,
            ),
            MetricOutput(
                name=f"kl_{self.variant}",
                description=f"KL(clean || modified) {by}",
                aggregation=PER_TOKEN,
                unit=NATS,
                range=(0, None),
            ),
            MetricOutput(
                name=f"ce_loss_score{self.suffix}",
                description=f"(ce_{self.variant} - ce_sae) / (ce_{self.variant} - ce_clean): 1 as clean, 0 as the "
                "baseline",
                aggregation=POOLED_RATIO,
                higher_is_better=True,
                headline=True,
                gap=True,
                cost_quality=self.plotted,
                vs_sparsity=self.plotted,
                order=20 + rank,
                note=self.note,
            ),
            MetricOutput(
                name=f"kl_div_score{self.suffix}",
                description=f"(kl_{self.variant} - kl_sae) / kl_{self.variant}: 1 as clean, 0 as the baseline",
                aggregation=POOLED_RATIO,
                higher_is_better=True,
                headline=True,
                gap=True,
                vs_sparsity=self.plotted,
                order=30 + rank,
            ),
        )


ZERO_ABLATION_NOTE = (
    "ce_loss_score = (ce_ablated - ce_sae) / (ce_ablated - ce_clean), with the hook zero-ablated for ce_ablated. "
    "Zero-ablating a residual-stream hook (resid_pre / resid_post) of a bias-free model makes every later layer "
    "see zeros: the logits are uniform and ce_ablated = ln(vocab) for every model, compressed or not, so the "
    "score's baseline says nothing about the hook (docs/METRICS.md). ce_loss_score_mean and kl_div_score_mean "
    "use the hook's mean activation over the eval tokens as the baseline instead."
)
BASELINES = (
    _Baseline("ablated", "", "zeros", plotted=True, note=ZERO_ABLATION_NOTE),
    _Baseline("mean_ablated", "_mean", "its mean over the eval tokens", plotted=False),
)
SPLICE_OUTPUTS = (
    MetricOutput(
        name="ce_clean", description="next-token cross-entropy of the model as it is", aggregation=PER_TOKEN, unit=NATS
    ),
    MetricOutput(
        name="ce_sae",
        description="next-token cross-entropy with the SAE's reconstruction spliced in",
        aggregation=PER_TOKEN,
        unit=NATS,
        higher_is_better=False,
    ),
    MetricOutput(
        name="kl_sae",
        description="KL(clean || with the SAE spliced in)",
        aggregation=PER_TOKEN,
        unit=NATS,
        higher_is_better=False,
        range=(0, None),
    ),
    MetricOutput(
        name="ce_tokens", description="next-token predictions CE is pooled over", aggregation="count", unit="tokens"
    ),
    MetricOutput(name="kl_tokens", description="positions KL is pooled over", aggregation="count", unit="tokens"),
    *(output for rank, baseline in enumerate(BASELINES) for output in baseline.outputs(rank)),
)
COUNTS = ("ce_tokens", "kl_tokens")  # no intervals
# ce_clean and the baselines' losses are the same for an SAE and its original: only the SAE's own keys differ
DIFFERENCES = ("ce_sae", "kl_sae", *(f"{s}{b.suffix}" for b in BASELINES for s in ("ce_loss_score", "kl_div_score")))
OUTPUTS = with_uncertainty(SPLICE_OUTPUTS, [o.name for o in SPLICE_OUTPUTS if o.name not in COUNTS], DIFFERENCES)


def _statistics(pooled: dict[str, _Pooled], variant: str) -> dict[str, Statistic]:
    """Every mean and score of the SAE spliced in as ``variant``, as functions of the block weights."""
    sae, clean = pooled[variant], pooled["clean"]
    found: dict[str, Statistic] = {"ce_clean": clean.mean_ce, "ce_sae": sae.mean_ce, "kl_sae": sae.mean_kl}
    for baseline in BASELINES:
        if baseline.variant in pooled:
            found |= baseline.scores(pooled[baseline.variant], sae, clean)
    return found


class CEKL:
    name = "ce_kl"
    scope = "splice"
    description = "CE / KL with the SAE spliced in, against clean and zero-ablated runs (ce_loss_score, kl_div_score)"
    outputs = OUTPUTS

    class Params(BootstrapParams):
        max_tokens: int = Field(
            8192, gt=0, description="eval tokens used (leading eval blocks); the same for every SAE"
        )
        batch_blocks: int = Field(4, gt=0)
        ablate_at: Literal["all", "sae"] = Field(
            "all", description="zero-ablate every position (SAELens) or only where the SAE is spliced in"
        )

    def compute_spliced(self, ctx: SpliceContext, params: Params) -> dict[str, dict[str, float]]:
        n_blocks = max(1, min(len(ctx.blocks), params.max_tokens // ctx.blocks.shape[1]))
        blocks = ctx.blocks[:n_blocks]
        variants: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"ablated": zero_ablation}
        if ctx.mean_activation is not None:
            mean = ctx.mean_activation.to(ctx.device)
            variants["mean_ablated"] = lambda x: mean.to(x.dtype).expand_as(x)
        variants |= {label: sae_transform(sae) for label, sae in ctx.saes.items()}
        originals = self._originals(ctx, variants)
        pooled = {name: _Pooled(n_blocks) for name in ["clean", *variants]}
        batches = range(0, n_blocks, params.batch_blocks)
        desc = f"CE/KL {ctx.hook}: {len(variants) + 1} passes per batch"
        scratch = _Scratch()
        for start in tqdm(batches, desc=desc, unit="batch", leave=False, disable=not ctx.progress):
            ids = blocks[start : start + params.batch_blocks].to(ctx.device)
            batch, hidden = _Batch(ids, start, ctx.tokenizer), ctx.prefix(ids)

            def logp(fn, mask, hidden=hidden) -> torch.Tensor:
                """Log-probabilities of one variant in float32, written over the previous variant's."""
                logits = suffix_logits(ctx.model, hidden, ctx.hook, fn, mask).flatten(0, 1)
                out = scratch.get("logp", logits.shape, logits.device)
                return torch.log_softmax(logits, dim=-1, dtype=torch.float32, out=out)

            clean = logp(None, None)
            batch.set_clean(clean, scratch)
            pooled["clean"].add(*batch.losses(clean), batch)
            for name, fn in variants.items():
                mask = None if name == "ablated" and params.ablate_at == "all" else batch.scored
                pooled[name].add(*batch.losses(logp(fn, mask)), batch)
        if ctx.clean_loss is not None:
            sums = pooled["clean"].sums.sums
            ctx.clean_loss(n_blocks, float(sums["ce"].sum()), int(sums["n_ce"].sum()))
        bootstrap, results = Bootstrap(n_blocks, params), {}
        for label in ctx.saes:
            mine = _statistics(pooled, label)
            found = {key: point(statistic, n_blocks) for key, statistic in mine.items()}
            found |= {"ce_tokens": pooled[label].count("ce"), "kl_tokens": pooled[label].count("kl")}
            found |= bootstrap.intervals(mine)
            if label in originals:
                theirs = _statistics(pooled, originals[label])
                differences = {key: mine[key] for key in DIFFERENCES if key in mine}
                their_points = {key: point(theirs[key], n_blocks) for key in differences}
                found |= bootstrap.differences(differences, theirs, found, their_points)
            results[label] = found
        return results

    @staticmethod
    def _originals(ctx: SpliceContext, variants: dict[str, Callable[[torch.Tensor], torch.Tensor]]) -> dict[str, str]:
        """Label -> the variant of its original SAE: the label of that SAE when it is scored here too, else a
        variant added to ``variants`` (once per original)."""
        names = {id(sae): label for label, sae in ctx.saes.items()}
        originals = {}
        for label, original in ctx.reference_saes.items():
            originals[label] = names.setdefault(id(original), f"original of {label}")
            variants.setdefault(originals[label], sae_transform(original))
        return originals


@hookimpl
def register_metrics(register):
    register(CEKL())
