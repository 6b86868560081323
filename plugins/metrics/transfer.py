"""Transfer metrics: how an SAE's latents behave on the compressed model against the base model, and how the SAE
lines up with the ``original`` one.

On the same eval tokens (row-aligned activations of M and M_c at the same hook), one streaming pass
(``saex.analysis.survival``):
- freq_shift_mean_abs = mean_j |density_j(M_c) - density_j(M)|, freq_corr = Pearson correlation of the
  two density vectors;
- act_corr_mean = mean over latents active on both models of the Pearson correlation, across tokens, of
  latent j's activation on M and on M_c;
- survival: each latent classed intact / shifted / dead on M_c / new on M_c / never firing (thresholds in
  ``saex.analysis.survival``, params of this metric); survival_intact = share of the latents firing on M that are
  intact, survival_intact_weighted the same weighted by their firing density on M (the share of M's latent
  firings that survive). The per-latent values and classes are stored with the cell (``per_latent``), their
  profile over firing frequency in its details (the report's figure).
Against the ``original`` SAE (for every other SAE: retrained, finetuned, pruned, ``original@seed=<n>``):
- dec_match_mean_max_cos = mean over latents of the largest cosine between its decoder row and any decoder
  row of the original SAE; dec_match_share_above_0.7 = share of latents whose largest cosine exceeds 0.7;
- align_{dec,enc}_*: one-to-one (Hungarian) matching of decoder rows / encoder columns (``saex.analysis.alignment``):
  mean matched cosine over the SAE's latents and the share above 0.7 and 0.9; the report prints them beside
  the same figures of ``original@seed=<n>`` (the seed noise floor). Skipped above ``align_max_latents``
  latents (the matching is cubic in the width: ~5 s at 4608 latents, minutes at 16k).
Zero decoder rows (latents removed by pruning) have cosine 0, never NaN.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from saex import (
    SURVIVAL_PROFILE,
    LatentPairs,
    MetricContext,
    MetricOutput,
    Survival,
    SurvivalParams,
    best_cosines,
    classify,
    frequency_profile,
    hookimpl,
    hungarian,
)

MATCH_THRESHOLD = 0.7
ALIGN_THRESHOLDS = (0.7, 0.9)
ALIGNED = {"dec": "decoder rows", "enc": "encoder columns"}
SURVIVAL_NOTE = (
    "intact: activation correlation >= 0.9, firing density within 2x and top-32 token overlap >= 0.5 on M vs M_c "
    "(default thresholds, params of the transfer metric; saex.analysis.survival)"
)


def _share(name: str, description: str, aggregation: str, **kwargs: object) -> MetricOutput:
    return MetricOutput(name=name, description=description, aggregation=aggregation, range=(0, 1), **kwargs)


OUTPUTS = (
    _share(
        "freq_shift_mean_abs",
        "|firing density on M_c - firing density on M| of each latent, same tokens",
        "mean over latents",
        higher_is_better=False,
    ),
    MetricOutput(
        name="freq_corr",
        description="Pearson correlation of the latents' firing densities on M and on M_c",
        aggregation="over latents",
        higher_is_better=True,
        range=(-1, 1),
    ),
    MetricOutput(
        name="act_corr_mean",
        description="Pearson correlation, token by token, of a latent's activation on M and on M_c",
        aggregation="mean over latents active on both models",
        higher_is_better=True,
        range=(-1, 1),
        headline=True,
        order=50,
    ),
    MetricOutput(
        name="act_corr_latents",
        description="latents active on both models (those act_corr_mean averages)",
        aggregation="count of latents",
        unit="latents",
        range=(0, None),
    ),
    _share(
        "survival_intact",
        "latents intact on M_c: same tokens, correlated activations, similar density, same top tokens",
        "share of the latents firing on M",
        higher_is_better=True,
        headline=True,
        order=52,
        label="intact",
        note=SURVIVAL_NOTE,
    ),
    _share(
        "survival_intact_weighted",
        "survival_intact weighted by each latent's firing density on M: the share of M's firings that survive",
        "density-weighted share of the latents firing on M",
        higher_is_better=True,
        order=53,
        label="intact (freq.-weighted)",
        note=SURVIVAL_NOTE,
    ),
    _share(
        "survival_shifted",
        "latents firing on M and M_c but not intact (weaker correlation, density or top tokens changed)",
        "share of the latents firing on M",
        order=54,
        note=SURVIVAL_NOTE,
    ),
    _share(
        "survival_dead",
        "latents that fire on M and never on M_c (same tokens)",
        "share of the latents firing on M",
        higher_is_better=False,
        order=55,
    ),
    _share("latents_new_on_mc", "latents that fire on M_c and never on M (same tokens)", "share of all latents"),
    _share("latents_never", "latents that fire on neither M nor M_c", "share of all latents"),
    _share(
        "top_overlap_mean",
        "overlap of a latent's top-activating token positions on M and on M_c (top_k of the params)",
        "mean over latents firing on both models",
        higher_is_better=True,
    ),
    MetricOutput(
        name="dec_match_mean_max_cos",
        description="largest cosine of a latent's decoder row with any decoder row of the original SAE",
        aggregation="mean over latents",
        higher_is_better=True,
        range=(-1, 1),
        headline=True,
        order=51,
    ),
    _share(
        f"dec_match_share_above_{MATCH_THRESHOLD}",
        f"latents whose decoder row has a cosine above {MATCH_THRESHOLD} with one of the original SAE",
        "share of latents",
        higher_is_better=True,
    ),
    *(
        output
        for part, what in ALIGNED.items()
        for output in (
            MetricOutput(
                name=f"align_{part}_mean_cos",
                description=f"cosine of a latent's {what} with its one-to-one (Hungarian) partner in the original SAE",
                aggregation="mean over the SAE's latents (0 for one left without a partner)",
                higher_is_better=True,
                range=(-1, 1),
                headline=part == "dec",
                noise_floor=True,
                order=56,
            ),
            *(
                _share(
                    f"align_{part}_share_above_{threshold}",
                    f"latents whose {what} match their Hungarian partner in the original SAE above cosine {threshold}",
                    "share of the SAE's latents",
                    higher_is_better=True,
                    noise_floor=True,
                    order=57,
                )
                for threshold in ALIGN_THRESHOLDS
            ),
        )
    ),
)


def latent_summary(latents: dict[str, torch.Tensor], classes: torch.Tensor) -> dict[str, float]:
    """The cell's values from the per-latent ones (``saex.analysis.survival``): frequency shift and correlation, and the
    survival shares."""
    density_m, density_mc, corr = latents["density_m"], latents["density_mc"], latents["act_corr"]
    on_m = density_m > 0
    both = on_m & (density_mc > 0)
    varies = density_m.std() > 0 and density_mc.std() > 0
    n_on_m = int(on_m.sum())

    def of_on_m(code: Survival) -> float:
        return float((classes == code).sum()) / n_on_m if n_on_m else math.nan

    weight = float(density_m.sum())
    correlated = ~corr.isnan()
    return {
        "freq_shift_mean_abs": float((density_mc - density_m).abs().mean()),
        "freq_corr": float(torch.corrcoef(torch.stack([density_m, density_mc]))[0, 1]) if varies else math.nan,
        "act_corr_mean": float(corr[correlated].mean()) if correlated.any() else math.nan,
        "act_corr_latents": float(correlated.sum()),
        "survival_intact": of_on_m(Survival.INTACT),
        "survival_intact_weighted": float(density_m[classes == Survival.INTACT].sum()) / weight if weight else math.nan,
        "survival_shifted": of_on_m(Survival.SHIFTED),
        "survival_dead": of_on_m(Survival.DEAD),
        "latents_new_on_mc": float((classes == Survival.NEW).double().mean()),
        "latents_never": float((classes == Survival.NEVER).double().mean()),
        "top_overlap_mean": float(latents["top_overlap"][both].mean()) if both.any() else math.nan,
    }


class Transfer:
    name = "transfer"
    scope = "sae"
    description = (
        "per-latent survival M vs M_c (correlation, frequency, top tokens; classes); decoder/encoder alignment "
        "with the original SAE (best cosine and one-to-one Hungarian matching)"
    )

    outputs = OUTPUTS

    class Params(SurvivalParams):
        align_max_latents: int = Field(
            16384, gt=0, description="no Hungarian alignment for SAEs wider than this (cubic cost in the width)"
        )

    @torch.no_grad()
    def compute(self, ctx: MetricContext, params: Params) -> dict[str, float]:
        values: dict[str, float] = {}
        if ctx.reference_activations is not None:
            values |= self._survival(ctx, params)
        if ctx.reference_sae is not None:
            values |= self._alignment(ctx, params)
        return values

    def _survival(self, ctx: MetricContext, params: Params) -> dict[str, float]:
        assert ctx.reference_activations is not None
        if ctx.reference_activations.n_tokens != ctx.eval_activations.n_tokens:
            raise ValueError("reference and eval activations must cover the same tokens (row-aligned)")
        pairs = LatentPairs(ctx.sae.d_sae, params.top_k)
        batches = zip(
            ctx.reference_activations.iter_batches(ctx.batch_size), ctx.eval_activations.iter_batches(ctx.batch_size)
        )
        for on_m, on_mc in batches:
            pairs.add(ctx.sae.encode(on_m.to(ctx.device)), ctx.sae.encode(on_mc.to(ctx.device)))
        latents = pairs.per_latent()
        classes = classify(latents, params)
        ctx.per_latent.update(latents, survival_class=classes)
        ctx.details[SURVIVAL_PROFILE] = frequency_profile(latents["density_m"], classes)
        return latent_summary(latents, classes)

    def _alignment(self, ctx: MetricContext, params: Params) -> dict[str, float]:
        sae, reference = ctx.sae, ctx.reference_sae
        assert reference is not None
        best = best_cosines(sae.W_dec, reference.W_dec)
        values = {
            "dec_match_mean_max_cos": float(best.mean()),
            f"dec_match_share_above_{MATCH_THRESHOLD}": float((best > MATCH_THRESHOLD).float().mean()),
        }
        if max(sae.d_sae, reference.d_sae) > params.align_max_latents:
            return values
        directions = {"dec": (sae.W_dec, reference.W_dec), "enc": (sae.W_enc.T, reference.W_enc.T)}
        for part, (mine, theirs) in directions.items():
            matching = hungarian(mine, theirs)
            ctx.per_latent |= {f"align_{part}_partner": matching.partner, f"align_{part}_cos": matching.cosine}
            values[f"align_{part}_mean_cos"] = float(matching.cosine.mean())
            for threshold in ALIGN_THRESHOLDS:
                values[f"align_{part}_share_above_{threshold}"] = float((matching.cosine > threshold).float().mean())
        return values


@hookimpl
def register_metrics(register):
    register(Transfer())
