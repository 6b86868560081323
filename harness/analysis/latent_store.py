"""Per-latent tensors the metrics of a cell produce (``MetricContext.per_latent``: survival classes, correlations,
alignment partners): one safetensors file in the cache, under a key derived from the cell's (which hashes all
that determines them), named in the row's ``details["per_latent"]``, so an analysis or a feature browser reads
them back with ``load_per_latent`` without recomputing the cell.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from saex.storage.cache import Cache, CacheError, cache_key

KIND = "per_latent"  # the cache kind, and the key of the entry in a row's ``details``
FILE = "per_latent.safetensors"


def store_per_latent(cache: Cache, cell_key: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, object]:
    """Write ``tensors`` for the cell ``cell_key`` (once) and return the ``details`` entry that finds them."""
    key = cache_key({"cell": cell_key, "what": KIND})

    def write(tmp: Path) -> dict:
        save_file({name: t.detach().cpu().contiguous() for name, t in tensors.items()}, str(tmp / FILE))
        return {"tensors": sorted(tensors)}

    cache.computed(KIND, key, write)
    return {"key": key, "file": FILE, "tensors": sorted(tensors)}


def load_per_latent(cache: Cache, details: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """The per-latent tensors of a cell from its row's ``details`` (verified against the cache manifest)."""
    entry = details.get(KIND)
    if not isinstance(entry, Mapping):
        raise CacheError("the cell stored no per-latent tensors (no details['per_latent'])")
    key = str(entry["key"])
    if cache.get(KIND, key) is None:
        raise CacheError(f"per-latent tensors {KIND}/{key} are not in the cache at {cache.root}")
    return load_file(str(cache.file(KIND, key, FILE)))
