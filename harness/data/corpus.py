"""Token blocks from a corpus: tokenized, packed into fixed-length blocks, split train / calibration / eval.

Documents are assigned to splits by a hash of their index (eval 10%, calibration 5%, train 85%), so the
splits are disjoint and the eval blocks do not change when the train budget does. Each block starts with
BOS; documents are separated by EOS. Special tokens are masked out of every metric (``special_mask``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from saex.storage.cache import Cache, cache_key

SPLITS = ("train", "calibration", "eval")
_SPLIT_SHARES = (("eval", 10), ("calibration", 5), ("train", 85))


def split_of(doc_index: int) -> str:
    bucket = int(hashlib.sha256(str(doc_index).encode()).hexdigest()[:8], 16) % 100
    for split, share in _SPLIT_SHARES:
        if bucket < share:
            return split
        bucket -= share
    raise AssertionError("split shares must add up to 100")


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def special_mask(input_ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """True where the token is a special token (BOS, EOS, PAD, ...)."""
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=input_ids.dtype, device=input_ids.device)
    return torch.isin(input_ids, special)


def row_blocks(blocks: torch.Tensor, tokenizer) -> torch.Tensor:
    """The block (row of ``blocks``) of each non-special token, in the order activation sources store them
    (block by block, special tokens dropped): int64 [n_tokens], what block-bootstrap intervals resample."""
    kept = (~special_mask(blocks, tokenizer)).sum(dim=1).cpu()
    return torch.repeat_interleave(torch.arange(len(blocks)), kept)


@dataclass
class TokenBlocks:
    key: str  # cache key: identifies the corpus, tokenizer, block size and budgets
    train: torch.Tensor  # [n_blocks, block_size] int64
    calibration: torch.Tensor
    eval: torch.Tensor

    def split(self, name: str) -> torch.Tensor:
        return getattr(self, name)


def _boundary_ids(tokenizer) -> tuple[int, int]:
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else bos
    if bos is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token: cannot mark block and document starts")
    return bos, eos


def pack(
    documents: Iterable[str], tokenizer, block_size: int, n_blocks: dict[str, int], *, progress: bool = True
) -> dict[str, torch.Tensor]:
    """Pack documents into ``n_blocks[split]`` blocks per split; stops reading once every split is full."""
    bos, eos = _boundary_ids(tokenizer)
    body = block_size - 1
    buffers: dict[str, list[int]] = {s: [] for s in SPLITS}
    blocks: dict[str, list[list[int]]] = {s: [] for s in SPLITS}
    total = sum(n_blocks.values())
    with tqdm(total=total, unit="block", desc="tokenizing", leave=False, disable=not progress) as bar:
        for index, text in enumerate(documents):
            split = split_of(index)
            if len(blocks[split]) >= n_blocks[split]:
                if all(len(blocks[s]) >= n_blocks[s] for s in SPLITS):
                    break
                continue
            buf = buffers[split]
            buf.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
            buf.append(eos)
            while len(buf) >= body and len(blocks[split]) < n_blocks[split]:
                blocks[split].append([bos, *buf[:body]])
                del buf[:body]
                bar.update(1)
    short = {s: (len(blocks[s]), n_blocks[s]) for s in SPLITS if len(blocks[s]) < n_blocks[s]}
    if short:
        detail = ", ".join(f"{s}: {have} of {want} blocks" for s, (have, want) in short.items())
        raise ValueError(f"the corpus is too small for the requested token budget ({detail}); lower `tokens`")
    return {s: torch.tensor(blocks[s], dtype=torch.long).reshape(-1, block_size) for s in SPLITS}


def token_blocks(
    cache: Cache,
    documents: Callable[[], Iterable[str]],
    corpus_fingerprint: str,
    tokenizer,
    block_size: int,
    tokens: dict[str, int],
    *,
    progress: bool = True,
) -> TokenBlocks:
    """Token blocks for every split, cached by corpus, tokenizer, block size and budgets."""
    n_blocks = {s: math.ceil(tokens[s] / block_size) for s in SPLITS}
    key = cache_key(
        {
            "corpus": corpus_fingerprint,
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "block_size": block_size,
            "n_blocks": n_blocks,
            "version": 1,
        }
    )

    def write(tmp: Path) -> dict[str, int]:
        packed = pack(documents(), tokenizer, block_size, n_blocks, progress=progress)
        save_file({s: t.contiguous() for s, t in packed.items()}, tmp / "blocks.safetensors")
        return n_blocks

    path = cache.computed("tokens", key, write)
    return TokenBlocks(key, **load_file(path / "blocks.safetensors"))
