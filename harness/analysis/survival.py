"""Per-latent survival of one SAE from M to M_c: the SAE encodes M's and M_c's activations of the same eval tokens
(row-aligned) and each latent is compared with itself, streaming, in memory bounded by [top_k, d_sae].

Per latent j (``LatentPairs.per_latent``; positions are eval token indices):
- ``density_m``, ``density_mc``: share of tokens where j fires (f_j != 0) on M, on M_c;
- ``act_corr``: Pearson correlation across tokens of f_j on M and on M_c (NaN when f_j is constant on either);
- ``freq_ratio`` = density_mc / density_m (inf when j fires on M_c only, NaN on neither);
- ``top_overlap`` = |T_M ∩ T_Mc| / max(|T_M|, |T_Mc|), T the positions of j's ``top_k`` largest activations on
  that model (fewer when it fires on fewer tokens), kept as a running top-k; NaN when j fires on neither.

Classes (``classify``, stored as the int8 codes of ``Survival``): ``never`` fires on neither model; ``dead`` fires
on M and never on M_c; ``new`` fires on M_c only; a latent firing on both is ``intact`` when act_corr >=
``min_corr`` (0.9), freq_ratio within a factor ``max_freq_factor`` (2) and top_overlap >= ``min_top_overlap``
(0.5), else ``shifted``.

Why these defaults: a correlation of 0.9 leaves 81% of the latent's variance on M explained token by token, the
same reading with noise on top; a latent firing twice (or half) as often has changed what it responds to, even
when its strongest tokens agree; and when fewer than half of its top-k tokens on M stay among its top-k on M_c,
the examples an interpretation is read from have changed. All three must hold. The same SAE on the same
activations has every firing latent intact.
"""

from __future__ import annotations

import math
from enum import IntEnum

import torch
from pydantic import BaseModel, Field

SURVIVAL_PROFILE = "survival_by_frequency"  # the cell ``details`` entry of ``frequency_profile`` (a report figure)


class Survival(IntEnum):
    """A latent's class from M to M_c (module doc), stored as this code."""

    INTACT = 0
    SHIFTED = 1
    DEAD = 2
    NEW = 3
    NEVER = 4


class SurvivalParams(BaseModel):
    """The thresholds of ``classify`` and the top-k of the overlap (module doc)."""

    model_config = {"extra": "forbid"}

    top_k: int = Field(32, gt=0, description="top-activating token positions per latent compared on M and M_c")
    min_corr: float = Field(0.9, ge=-1, le=1, description="intact: activation correlation at least this")
    max_freq_factor: float = Field(2.0, ge=1, description="intact: firing densities within this factor")
    min_top_overlap: float = Field(0.5, ge=0, le=1, description="intact: top-k position overlap at least this")


class RunningTopK:
    """Each column's ``k`` largest positive values seen so far and their row positions, fed batch by batch."""

    def __init__(self, d: int, k: int):
        self.k = k
        self.values = torch.zeros(k, d)
        self.positions = torch.full((k, d), -1, dtype=torch.long)

    def add(self, f: torch.Tensor, offset: int) -> None:
        """Merge batch ``f`` [n, d] whose rows are positions ``offset .. offset + n - 1``."""
        top = f.float().topk(min(self.k, len(f)), dim=0)
        values = torch.cat([self.values, top.values])
        positions = torch.cat([self.positions, top.indices + offset])
        merged = values.topk(self.k, dim=0)
        self.values, self.positions = merged.values, positions.gather(0, merged.indices)

    def found(self) -> torch.Tensor:
        """Bool [k, d]: the entries that hold a positive value (a latent's top-k of non-firing tokens is empty)."""
        return self.values > 0


class LatentPairs:
    """Streaming float64 sums over tokens of two codes of the same latents (``a`` on M, ``b`` on M_c, row-aligned)
    and each latent's running top-k positions on both."""

    def __init__(self, d_sae: int, top_k: int):
        zeros = lambda: torch.zeros(d_sae, dtype=torch.float64)
        self.sa, self.sb, self.saa, self.sbb, self.sab = zeros(), zeros(), zeros(), zeros(), zeros()
        self.fa, self.fb = zeros(), zeros()
        self.top_a, self.top_b = RunningTopK(d_sae, top_k), RunningTopK(d_sae, top_k)
        self.n = 0

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = a.cpu(), b.cpu()
        self.top_a.add(a, self.n)
        self.top_b.add(b, self.n)
        # the sums run over the nonzero entries only (a latent code is sparse): the same float64 sums as over
        # every token, without [n, d_sae] float64 copies (4x faster)
        on_a, on_b = a != 0, b != 0
        for code, on, s, ss, fired in ((a, on_a, self.sa, self.saa, self.fa), (b, on_b, self.sb, self.sbb, self.fb)):
            rows, latents = on.nonzero(as_tuple=True)
            values = code[rows, latents].double()
            s.index_add_(0, latents, values)
            ss.index_add_(0, latents, values * values)
            fired.index_add_(0, latents, torch.ones_like(values))
        rows, latents = (on_a & on_b).nonzero(as_tuple=True)
        self.sab.index_add_(0, latents, a[rows, latents].double() * b[rows, latents].double())
        self.n += len(a)

    def per_latent(self) -> dict[str, torch.Tensor]:
        """The per-latent values of the module doc, float64 [d_sae] each."""
        n = self.n
        cov = self.sab - self.sa * self.sb / n
        var_a, var_b = self.saa - self.sa**2 / n, self.sbb - self.sb**2 / n
        varies = (var_a > 0) & (var_b > 0)
        corr = torch.where(varies, cov / (var_a * var_b).clamp_min(1e-300).sqrt(), math.nan)
        density_m, density_mc = self.fa / n, self.fb / n
        return {
            "density_m": density_m,
            "density_mc": density_mc,
            "act_corr": corr.clamp(-1, 1),
            "freq_ratio": density_mc / density_m,
            "top_overlap": self._top_overlap(),
        }

    def _top_overlap(self) -> torch.Tensor:
        in_a, in_b = self.top_a.found(), self.top_b.found()
        shared = (self.top_a.positions[:, None, :] == self.top_b.positions[None, :, :]) & in_b[None]
        common = (shared.any(1) & in_a).sum(0).double()
        size = torch.maximum(in_a.sum(0), in_b.sum(0)).double()
        return torch.where(size > 0, common / size.clamp_min(1), math.nan)


def classify(latents: dict[str, torch.Tensor], params: SurvivalParams) -> torch.Tensor:
    """int8 [d_sae]: each latent's ``Survival`` code (module doc)."""
    on_m, on_mc = latents["density_m"] > 0, latents["density_mc"] > 0
    ratio = latents["freq_ratio"]
    intact = (
        (latents["act_corr"] >= params.min_corr)
        & (ratio <= params.max_freq_factor)
        & (ratio >= 1 / params.max_freq_factor)
        & (latents["top_overlap"] >= params.min_top_overlap)
    )
    classes = torch.full(on_m.shape, Survival.SHIFTED, dtype=torch.int8)
    classes[on_m & on_mc & intact] = Survival.INTACT
    classes[on_m & ~on_mc] = Survival.DEAD
    classes[~on_m & on_mc] = Survival.NEW
    classes[~on_m & ~on_mc] = Survival.NEVER
    return classes


def frequency_profile(density_m: torch.Tensor, classes: torch.Tensor) -> dict[str, list[dict[str, float]]]:
    """The latents firing on M per decade of their firing density on M (``low`` < density <= ``high``): how many,
    and the share of them in each class they can be in (intact, shifted, dead). JSON-able, for the cell's
    ``details[SURVIVAL_PROFILE]``: what the report's survival-against-frequency figure draws."""
    alive = density_m > 0
    if not alive.any():
        return {"bins": []}
    lowest = math.floor(math.log10(float(density_m[alive].min())))
    bins = []
    for exponent in range(lowest, 0):
        low, high = 10.0**exponent, 10.0 ** (exponent + 1)
        inside = (density_m > low) & (density_m <= high)
        if exponent == lowest:
            inside |= alive & (density_m <= low)  # a density of exactly 10^lowest
        count = int(inside.sum())
        if count:
            kinds = (Survival.INTACT, Survival.SHIFTED, Survival.DEAD)
            share = {c.name.lower(): float((classes[inside] == c).sum()) / count for c in kinds}
            bins.append({"low": low, "high": high, "latents": count, **share})
    return {"bins": bins}
