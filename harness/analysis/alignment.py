"""Latent-to-latent alignment of two SAEs by the cosine of their directions (decoder rows, or encoder columns).

``hungarian`` matches them one to one (scipy's ``linear_sum_assignment``, maximising the summed cosine): unlike
the best cosine per latent, no two latents can claim the same partner, so a permuted copy aligns at exactly 1
and two SAEs sharing a few directions cannot look aligned through them. Two SAEs trained on the same data with
different seeds share only part of their latents under this matching (Paulo & Belrose, arXiv 2501.16615), which
is why ``original@seed=<n>`` (``saex.config.sources``) gives every such figure its noise floor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[len(a), len(b)] cosines of the rows of ``a`` and ``b``, float32; a zero row (a latent removed by pruning)
    has cosine 0 with everything, never NaN."""
    return F.normalize(a.detach().float(), dim=1) @ F.normalize(b.detach().float().to(a.device), dim=1).T


@dataclass
class Matching:
    """For each row of ``a``: its partner row of ``b`` (-1 when ``a`` has more rows and it is left over) and their
    cosine (0 when left over)."""

    partner: torch.Tensor  # int64 [len(a)]
    cosine: torch.Tensor  # float32 [len(a)]


def hungarian(a: torch.Tensor, b: torch.Tensor) -> Matching:
    """The one-to-one matching of the rows of ``a`` to rows of ``b`` with the largest summed cosine. When every
    row's best partner is a different row of ``b`` (an SAE against its pruned or fine-tuned self, mostly), that
    is the matching: no one-to-one matching sums more than the row maxima. Otherwise scipy solves it."""
    similarity = cosines(a, b).cpu()
    best = similarity.argmax(dim=1)
    if len(a) <= len(b) and len(best.unique()) == len(a):
        rows, cols = torch.arange(len(a)), best
    else:
        found = linear_sum_assignment(similarity.numpy(), maximize=True)
        rows, cols = (torch.from_numpy(index.astype(np.int64)) for index in found)
    partner = torch.full((len(a),), -1, dtype=torch.long)
    cosine = torch.zeros(len(a))
    partner[rows], cosine[rows] = cols, similarity[rows, cols]
    return Matching(partner, cosine)


def best_cosines(a: torch.Tensor, b: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Largest cosine of each row of ``a`` with any row of ``b`` (several rows may pick the same one), in
    chunks of ``a`` so memory stays [chunk, len(b)]."""
    return torch.cat([cosines(a[i : i + chunk], b).max(dim=1).values for i in range(0, len(a), chunk)])
