"""Per-latent data the feature browser shows for one SAE on M and on M_c (the same eval tokens), computed by
streaming the cached eval activations (row-aligned on both models) and cached by content key, so an unchanged
matrix recomputes nothing.

``latent_pass`` (every latent, one pass, memory [top_k, d_sae]): what ``saex.analysis.survival.LatentPairs`` gathers
(firing densities, activation correlation, frequency ratio, top-position overlap) with each latent's running
top-k activations and their token positions on both models. ``context_pass`` (the selected latents only, a
second pass, memory [window rows, selected]): each one's activation histogram on both models (a bin of the
tokens where it is 0, then ``BINS`` equal bins up to its largest activation on either model, so the counts add
up to the eval token count), its activations on both models at every token of the windows around its top
positions, and the output tokens its decoder row promotes and suppresses through the unembedding.

Positions are activation rows: the eval split's non-special tokens in order (``TokenWindows`` maps them back
to the token blocks).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from saex.analysis.survival import LatentPairs
from saex.data.corpus import special_mask
from saex.plugin.protocols import ActivationSource
from saex.sae.base import SAE
from saex.storage.cache import Cache, cache_key

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

KIND = "features"  # cache kind of both passes
FILE = "latents.safetensors"
VERSION = 1
BINS = 32
LOGIT_TOKENS = 10  # promoted and suppressed output tokens kept per latent
BATCH_ELEMENTS = 1 << 22  # latent activations per batch: rows = this // d_sae


@dataclass
class LatentPass:
    """Every latent of the SAE: ``per_latent`` as ``LatentPairs.per_latent`` gives it (float64 [d_sae] each) and
    ``top_{m,mc}_{values,positions}`` [top_k, d_sae], largest first (value 0, position -1 past its firings)."""

    key: str
    n_tokens: int
    tensors: dict[str, torch.Tensor]

    @property
    def d_sae(self) -> int:
        return len(self.tensors["density_m"])


@dataclass
class ContextPass:
    """The selected latents (``latents`` [S]): ``hist_{m,mc}`` [S, BINS + 1] token counts (bin 0: activation 0;
    bin i: ((i-1)/BINS, i/BINS] of ``hist_max`` [S]); ``rows`` [R] the activation rows of every context window,
    sorted, with ``window_{m,mc}`` [R, S] the latents' activations there; ``promoted`` / ``suppressed`` [S, n]
    token ids with ``promoted_logit`` / ``suppressed_logit`` their direct logit effect (W_dec row @ W_U^T)."""

    tensors: dict[str, torch.Tensor]


def _batch_rows(d_sae: int) -> int:
    return max(64, BATCH_ELEMENTS // d_sae)


@torch.no_grad()
def encoded_pairs(
    sae: SAE, on_m: ActivationSource, on_mc: ActivationSource, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The SAE's latent activations on M and on M_c, batch by batch in token order, on the CPU."""
    if on_m.n_tokens != on_mc.n_tokens:
        raise ValueError("activations of M and M_c must cover the same eval tokens (row-aligned)")
    rows = _batch_rows(sae.d_sae)
    for a, b in zip(on_m.iter_batches(rows), on_mc.iter_batches(rows)):
        yield sae.encode(a.to(device)).float().cpu(), sae.encode(b.to(device)).float().cpu()


def _cached(cache: Cache, key: str, write: Callable[[Path], dict]) -> tuple[dict[str, torch.Tensor], dict]:
    cache.computed(KIND, key, write)
    return load_file(str(cache.file(KIND, key, FILE))), cache.meta(KIND, key)


def latent_pass(
    cache: Cache,
    sae: SAE,
    sae_key: str,
    on_m: ActivationSource,
    on_mc: ActivationSource,
    top_k: int,
    device: torch.device,
) -> LatentPass:
    """Every latent's survival values and top-k positions on both models (module doc); ``sae_key`` and the
    activations' cache directories identify the inputs."""
    key = cache_key(
        {"what": "latents", "sae": sae_key, "m": _identity(on_m), "mc": _identity(on_mc), "top_k": top_k, "v": VERSION}
    )

    def write(tmp: Path) -> dict:
        pairs = LatentPairs(sae.d_sae, top_k)
        for a, b in encoded_pairs(sae, on_m, on_mc, device):
            pairs.add(a, b)
        tensors = pairs.per_latent() | {
            "top_m_values": pairs.top_a.values,
            "top_m_positions": pairs.top_a.positions,
            "top_mc_values": pairs.top_b.values,
            "top_mc_positions": pairs.top_b.positions,
        }
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / FILE))
        return {"n_tokens": pairs.n}

    tensors, meta = _cached(cache, key, write)
    return LatentPass(key, int(meta["n_tokens"]), tensors)


def _identity(acts: ActivationSource) -> str:
    """The cache directory name of cached activations (their content key)."""
    path = getattr(acts, "path", None)
    if path is None:
        raise TypeError("the feature browser reads cached activations (ShardedActivations)")
    return Path(path).name


def context_pass(
    cache: Cache,
    sae: SAE,
    latents: LatentPass,
    on_m: ActivationSource,
    on_mc: ActivationSource,
    selected: torch.Tensor,
    rows: torch.Tensor,
    unembedding: torch.Tensor,
    device: torch.device,
) -> ContextPass:
    """Histograms, window activations and logit effects of the ``selected`` latents (module doc); ``rows``: the
    activation rows of their context windows. ``unembedding`` [vocab, d_model] is M's output embedding."""
    selected, rows = selected.long(), torch.unique(rows.long())
    key = cache_key(
        {
            "what": "contexts",
            "latents": latents.key,
            "selected": selected.tolist(),
            "rows": cache_key({"rows": rows.tolist()}),
            "bins": BINS,
            "v": VERSION,
        }
    )

    def write(tmp: Path) -> dict:
        t = latents.tensors
        peak = torch.maximum(t["top_m_values"][0, selected], t["top_mc_values"][0, selected])
        peak = torch.where(peak > 0, peak, torch.ones_like(peak))
        hist = {"m": torch.zeros(len(selected), BINS + 1, dtype=torch.long)}
        hist["mc"] = hist["m"].clone()
        window = {name: torch.zeros(len(rows), len(selected)) for name in ("m", "mc")}
        offset = 0
        for a, b in encoded_pairs(sae, on_m, on_mc, device):
            lo, hi = torch.searchsorted(rows, offset), torch.searchsorted(rows, offset + len(a))
            for name, f in (("m", a[:, selected]), ("mc", b[:, selected])):
                bins = torch.where(f != 0, (f / peak * BINS).ceil().clamp(1, BINS), 0).long()
                hist[name].scatter_add_(1, bins.T, torch.ones_like(bins.T))
                window[name][lo:hi] = f[rows[lo:hi] - offset]
            offset += len(a)
        effect = sae.W_dec.detach().float().cpu()[selected] @ unembedding.float().cpu().T
        n = min(LOGIT_TOKENS, effect.shape[1])
        up, down = effect.topk(n, dim=1), effect.topk(n, dim=1, largest=False)
        tensors = {
            "latents": selected,
            "hist_max": peak,
            "hist_m": hist["m"],
            "hist_mc": hist["mc"],
            "rows": rows,
            "window_m": window["m"],
            "window_mc": window["mc"],
            "promoted": up.indices,
            "promoted_logit": up.values,
            "suppressed": down.indices,
            "suppressed_logit": down.values,
        }
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / FILE))
        return {"latents": len(selected)}

    tensors, _ = _cached(cache, key, write)
    return ContextPass(tensors)


class TokenWindows:
    """The eval token blocks [n_blocks, block_size] seen from the activation rows (their non-special tokens in
    order, as ``saex.model.activations`` collects them): a row's token and the window of tokens around it, never
    crossing into another block."""

    def __init__(self, blocks: torch.Tensor, tokenizer: "PreTrainedTokenizerBase", before: int, after: int):
        self.ids, self.block_size, self.before, self.after = blocks.flatten(), blocks.shape[1], before, after
        self.positions = (~special_mask(blocks, tokenizer)).flatten().nonzero().flatten()  # row -> flat index
        self.row_of = torch.full((len(self.ids),), -1, dtype=torch.long)  # flat index -> row (-1: special)
        self.row_of[self.positions] = torch.arange(len(self.positions))

    def window(self, row: int) -> range:
        """Flat token indices of the window around activation row ``row``."""
        flat = int(self.positions[row])
        start = flat - flat % self.block_size
        return range(max(start, flat - self.before), min(start + self.block_size, flat + self.after + 1))

    def rows(self, top_rows: Iterable[int]) -> torch.Tensor:
        """The activation rows of the windows around ``top_rows`` (special tokens have none)."""
        flats = [f for row in top_rows for f in self.window(row)]
        rows = self.row_of[torch.tensor(flats, dtype=torch.long)] if flats else torch.zeros(0, dtype=torch.long)
        return torch.unique(rows[rows >= 0])
