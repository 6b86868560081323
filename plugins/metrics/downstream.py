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
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from saex import SpliceContext, hookimpl, prefix, sae_transform, special_mask, suffix_logits, zero_ablation


class _Pooled:
    """Float64 sums of per-token CE and KL for one variant."""

    def __init__(self) -> None:
        self.ce = 0.0
        self.kl = 0.0
        self.n_ce = 0
        self.n_kl = 0

    def add(
        self,
        logp: torch.Tensor,
        clean_logp: torch.Tensor,
        clean_p: torch.Tensor,
        has_target: torch.Tensor,
        targets: torch.Tensor,
    ) -> None:
        """``logp``/``clean_logp``: [n, vocab] at the scored positions, ``clean_p`` = ``clean_logp.exp()``;
        ``has_target`` [n] marks the rows that predict ``targets``."""
        self.ce += float(F.nll_loss(logp[has_target], targets, reduction="sum").double())
        self.kl += float((clean_p * (clean_logp - logp)).sum().double())
        self.n_ce += len(targets)
        self.n_kl += len(logp)

    @property
    def mean_ce(self) -> float:
        return self.ce / self.n_ce

    @property
    def mean_kl(self) -> float:
        return self.kl / self.n_kl


def _score(worse: float, better: float, best: float) -> float:
    """(worse - better) / (worse - best), NaN when the baseline does not move the loss."""
    denominator = worse - best
    return (worse - better) / denominator if denominator != 0 else math.nan


def _scores(baseline: _Pooled, sae: _Pooled, clean: _Pooled, name: str, suffix: str) -> dict[str, float]:
    """The baseline's CE and KL and the SAE's scores against it (``ce_loss_score{suffix}``,
    ``kl_div_score{suffix}``)."""
    return {
        f"ce_{name}": baseline.mean_ce,
        f"kl_{name}": baseline.mean_kl,
        f"ce_loss_score{suffix}": _score(baseline.mean_ce, sae.mean_ce, clean.mean_ce),
        f"kl_div_score{suffix}": _score(baseline.mean_kl, sae.mean_kl, 0.0),
    }


class CEKL:
    name = "ce_kl"
    scope = "splice"
    description = "CE / KL with the SAE spliced in, against clean and zero-ablated runs (ce_loss_score, kl_div_score)"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
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
        pooled = {name: _Pooled() for name in ["clean", *variants]}
        for start in range(0, n_blocks, params.batch_blocks):
            ids = blocks[start : start + params.batch_blocks].to(ctx.device)
            scored = ~special_mask(ids, ctx.tokenizer)
            predicts = scored.clone()
            predicts[:, -1] = False
            has_target = predicts[scored]
            targets = ids[:, 1:][predicts[:, :-1]]
            hidden = prefix(ctx.model, ids, ctx.hook)

            def logp(fn, mask, hidden=hidden, scored=scored) -> torch.Tensor:
                logits = suffix_logits(ctx.model, hidden, ctx.hook, fn, mask)
                return F.log_softmax(logits[scored].float(), dim=-1)

            clean = logp(None, None)
            clean_p = clean.exp()  # once per batch, not per variant
            pooled["clean"].add(clean, clean, clean_p, has_target, targets)
            for name, fn in variants.items():
                mask = None if name == "ablated" and params.ablate_at == "all" else scored
                pooled[name].add(logp(fn, mask), clean, clean_p, has_target, targets)
        clean, results = pooled["clean"], {}
        for label in ctx.saes:
            sae = pooled[label]
            found = {
                "ce_clean": clean.mean_ce,
                "ce_sae": sae.mean_ce,
                "kl_sae": sae.mean_kl,
                "ce_tokens": float(sae.n_ce),
                "kl_tokens": float(sae.n_kl),
            }
            for baseline, suffix in (("ablated", ""), ("mean_ablated", "_mean")):
                if baseline in pooled:
                    found |= _scores(pooled[baseline], sae, clean, baseline, suffix)
            results[label] = found
        return results


@hookimpl
def register_metrics(register):
    register(CEKL())
