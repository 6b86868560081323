"""Transfer metrics: how an SAE's latents behave on the compressed model against the base model.

On the same eval tokens (row-aligned activations of M and M_c at the same hook):
- freq_shift_mean_abs = mean_j |density_j(M_c) - density_j(M)|, freq_corr = Pearson correlation of the
  two density vectors;
- act_corr_mean = mean over latents active on both models of the Pearson correlation, across tokens, of
  latent j's activation on M and on M_c.
Against the ``original`` SAE (for retrained, pruned and loaded SAEs):
- dec_match_mean_max_cos = mean over latents of the largest cosine between its decoder row and any decoder
  row of the original SAE; dec_match_share_above_0.7 = share of latents whose largest cosine exceeds 0.7.
Zero decoder rows (latents removed by pruning) have cosine 0, never NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict

from saex import MetricContext, MetricOutput, hookimpl

MATCH_THRESHOLD = 0.7
OUTPUTS = (
    MetricOutput(
        name="freq_shift_mean_abs",
        description="|firing density on M_c - firing density on M| of each latent, same tokens",
        aggregation="mean over latents",
        higher_is_better=False,
        range=(0, 1),
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
    MetricOutput(
        name="dec_match_mean_max_cos",
        description="largest cosine of a latent's decoder row with any decoder row of the original SAE",
        aggregation="mean over latents",
        higher_is_better=True,
        range=(-1, 1),
        headline=True,
        order=51,
    ),
    MetricOutput(
        name=f"dec_match_share_above_{MATCH_THRESHOLD}",
        description=f"latents whose decoder row has a cosine above {MATCH_THRESHOLD} with one of the original SAE",
        aggregation="share of latents",
        higher_is_better=True,
        range=(0, 1),
    ),
)


class _LatentPairStats:
    """Streaming float64 sums for per-latent Pearson correlation and firing densities of two codes."""

    def __init__(self, d_sae: int):
        zeros = lambda: torch.zeros(d_sae, dtype=torch.float64)
        self.sa, self.sb, self.saa, self.sbb, self.sab = zeros(), zeros(), zeros(), zeros(), zeros()
        self.fa, self.fb = zeros(), zeros()
        self.n = 0

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = a.double().cpu(), b.double().cpu()
        self.sa += a.sum(0)
        self.sb += b.sum(0)
        self.saa += (a * a).sum(0)
        self.sbb += (b * b).sum(0)
        self.sab += (a * b).sum(0)
        self.fa += (a != 0).sum(0)
        self.fb += (b != 0).sum(0)
        self.n += len(a)

    def result(self) -> dict[str, float]:
        n = self.n
        cov = self.sab - self.sa * self.sb / n
        var_a, var_b = self.saa - self.sa**2 / n, self.sbb - self.sb**2 / n
        active = (var_a > 0) & (var_b > 0)
        corr = cov[active] / (var_a[active] * var_b[active]).sqrt()
        da, db = self.fa / n, self.fb / n
        return {
            "freq_shift_mean_abs": float((db - da).abs().mean()),
            "freq_corr": float(torch.corrcoef(torch.stack([da, db]))[0, 1])
            if da.std() > 0 and db.std() > 0
            else float("nan"),
            "act_corr_mean": float(corr.mean()) if active.any() else float("nan"),
            "act_corr_latents": float(active.sum()),
        }


def decoder_match(w_dec: torch.Tensor, reference: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Largest cosine of each row of ``w_dec`` with any row of ``reference``; 0 for zero rows."""
    a = F.normalize(w_dec.float(), dim=1)  # normalize maps a zero row to zero (eps), not NaN
    b = F.normalize(reference.float().to(a.device), dim=1)
    return torch.cat([(a[i : i + chunk] @ b.T).max(dim=1).values for i in range(0, len(a), chunk)])


class Transfer:
    name = "transfer"
    scope = "sae"
    description = (
        "firing-frequency shift and per-latent activation correlation M vs M_c; decoder match to the original SAE"
    )

    outputs = OUTPUTS

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

    @torch.no_grad()
    def compute(self, ctx: MetricContext, params: Params) -> dict[str, float]:
        values: dict[str, float] = {}
        if ctx.reference_activations is not None:
            if ctx.reference_activations.n_tokens != ctx.eval_activations.n_tokens:
                raise ValueError("reference and eval activations must cover the same tokens (row-aligned)")
            stats = _LatentPairStats(ctx.sae.d_sae)
            pairs = zip(
                ctx.reference_activations.iter_batches(ctx.batch_size),
                ctx.eval_activations.iter_batches(ctx.batch_size),
            )
            for ref, cur in pairs:
                stats.add(ctx.sae.encode(ref.to(ctx.device)), ctx.sae.encode(cur.to(ctx.device)))
            values |= stats.result()
        if ctx.reference_sae is not None:
            best = decoder_match(ctx.sae.W_dec.detach(), ctx.reference_sae.W_dec.detach())
            values |= {
                "dec_match_mean_max_cos": float(best.mean()),
                f"dec_match_share_above_{MATCH_THRESHOLD}": float((best > MATCH_THRESHOLD).float().mean()),
            }
        return values


@hookimpl
def register_metrics(register):
    register(Transfer())
