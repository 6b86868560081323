"""Activation sources: in-memory tensors and the on-disk sharded store."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from saex.data.corpus import special_mask
from saex.model.hookpoints import HookPoint, capture
from saex.storage.cache import Cache, cache_key


class TensorActivations:
    """An ``ActivationSource`` over an in-memory tensor [n_tokens, d_in] (tests, small calibration sets)."""

    def __init__(self, x: torch.Tensor):
        if x.ndim != 2:
            raise ValueError(f"activations must be [n_tokens, d_in], got shape {tuple(x.shape)}")
        self.x = x.float().cpu()
        self.n_tokens, self.d_in = self.x.shape

    def iter_batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0) -> Iterator[torch.Tensor]:
        order = _order(self.n_tokens, shuffle, seed)
        for start in range(0, self.n_tokens, batch_size):
            yield self.x[order[start : start + batch_size]]


def _order(n: int, shuffle: bool, seed: int) -> torch.Tensor:
    if not shuffle:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


class ShardedActivations:
    """An ``ActivationSource`` over a cached directory of safetensors shards; reads one shard at a time.

    Shuffled reads permute the shard order and the rows inside each shard (bounded memory: one shard plus
    one partial batch), which is enough mixing for SAE training on shards of tens of thousands of tokens.
    """

    def __init__(self, path: Path, meta: dict, shards: list[Path] | None = None):
        """``shards``: the shard files, resolved by the cache (``Cache.file``) so a name in ``meta`` can never
        point out of the directory; default ``path / name`` for stores the caller built itself."""
        self.path = path
        self.n_tokens = int(meta["n_tokens"])
        self.d_in = int(meta["d_in"])
        self.shards: list[Path] = shards if shards is not None else [path / name for name in meta["shards"]]
        # wall time of the model pass that collected them (shared by the hooks collected together); None for
        # caches written before it was recorded
        self.seconds: float | None = meta.get("seconds")

    def iter_batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0) -> Iterator[torch.Tensor]:
        shard_order = _order(len(self.shards), shuffle, seed)
        carry: torch.Tensor | None = None
        for i, shard_index in enumerate(shard_order.tolist()):
            x = load_file(self.shards[shard_index])["x"].float()
            x = x[_order(len(x), shuffle, seed * 7919 + i)]
            if carry is not None:
                x = torch.cat([carry, x])
            full = len(x) - len(x) % batch_size
            for start in range(0, full, batch_size):
                yield x[start : start + batch_size]
            carry = x[full:]
        if carry is not None and len(carry):
            yield carry


ACTIVATIONS_VERSION = 1


def collect_activations(
    cache: Cache,
    model: nn.Module | Callable[[], nn.Module],
    tokenizer,
    blocks: torch.Tensor,
    hooks: list[HookPoint],
    key_parts: dict,
    *,
    device: torch.device,
    batch_blocks: int = 8,
    shard_tokens: int = 65_536,
    desc: str = "collecting",
    progress: bool = True,
) -> dict[HookPoint, ShardedActivations]:
    """Activations at ``hooks`` for every non-special token of ``blocks`` [n, block_size], cached.

    ``key_parts`` must describe everything else that determines them (model fingerprint, compression,
    tokens, dtype). Hooks already cached are not recomputed; the rest share one early-stopped pass.
    ``model`` may be a callable returning the model, called only when something must be collected.
    """
    keys = {h: cache_key({**key_parts, "hook": str(h), "version": ACTIVATIONS_VERSION}) for h in hooks}
    with contextlib.ExitStack() as locks:  # sorted: two processes never wait on each other's locks
        for key in sorted(keys.values()):
            locks.enter_context(cache.locked("activations", key))
        missing = [h for h in hooks if cache.get("activations", keys[h]) is None]
        if missing:
            if not isinstance(model, nn.Module):
                model = model()
            _collect_missing(
                cache, model, tokenizer, blocks, missing, keys, device, batch_blocks, shard_tokens, desc, progress
            )
    return {h: _cached(cache, keys[h]) for h in hooks}


def _cached(cache: Cache, key: str) -> ShardedActivations:
    meta = cache.meta("activations", key)
    shards = cache.files("activations", key, [str(name) for name in meta["shards"]])
    return ShardedActivations(cache.dir("activations", key), meta, shards)


class NonFiniteActivations(ValueError):
    """Activations with NaN/Inf: never cached, never scored (every metric on them would be meaningless)."""


class _ShardWriter:
    def __init__(self, directory: Path, shard_tokens: int):
        self.directory, self.shard_tokens = directory, shard_tokens
        self.pending: list[torch.Tensor] = []
        self.pending_rows = 0
        self.shards: list[str] = []
        self.n_tokens = 0
        self.d_in = 0

    def add(self, x: torch.Tensor) -> None:
        if not torch.isfinite(x).all():
            bad = int((~torch.isfinite(x)).any(-1).sum())
            raise NonFiniteActivations(f"the model produced NaN/Inf activations at {bad} of {len(x)} tokens")
        self.pending.append(x.float().cpu())
        self.pending_rows += len(x)
        self.d_in = x.shape[-1]
        if self.pending_rows >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self.pending_rows:
            return
        name = f"shard_{len(self.shards):05d}.safetensors"
        save_file({"x": torch.cat(self.pending).contiguous()}, self.directory / name)
        self.shards.append(name)
        self.n_tokens += self.pending_rows
        self.pending, self.pending_rows = [], 0

    def meta(self) -> dict:
        self.flush()
        return {"n_tokens": self.n_tokens, "d_in": self.d_in, "shards": self.shards}


def _collect_missing(
    cache, model, tokenizer, blocks, hooks, keys, device, batch_blocks, shard_tokens, desc, progress
) -> None:
    tmp_dirs = {h: cache.temporary(cache.root / "activations", "collect") for h in hooks}
    try:
        writers = {h: _ShardWriter(tmp_dirs[h], shard_tokens) for h in hooks}
        start_time = time.perf_counter()
        with tqdm(total=blocks.numel(), unit="tok", desc=desc, disable=not progress) as bar:
            for start in range(0, len(blocks), batch_blocks):
                ids = blocks[start : start + batch_blocks].to(device)
                keep = ~special_mask(ids, tokenizer)
                acts = capture(model, ids, hooks)
                for h in hooks:
                    writers[h].add(acts[h][keep])
                bar.update(ids.numel())
        seconds = time.perf_counter() - start_time
        for h in hooks:
            meta = {**writers[h].meta(), "seconds": seconds}
            cache.put("activations", keys[h], lambda d, h=h, meta=meta: _move_into(tmp_dirs[h], d, meta))
    finally:
        for d in tmp_dirs.values():
            shutil.rmtree(d, ignore_errors=True)


def _move_into(src: Path, dst: Path, meta: dict) -> dict:
    for f in src.iterdir():
        os.replace(f, dst / f.name)
    return meta
