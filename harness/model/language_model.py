"""Next-token loss of a model on token blocks, with the conventions of docs/METRICS.md: predictions made
from a special token are dropped, and the loss is a pooled mean over all remaining tokens."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from saex.data.corpus import special_mask


@torch.no_grad()
def next_token_loss(
    model: nn.Module,
    blocks: torch.Tensor,
    tokenizer,
    *,
    device: torch.device,
    batch_blocks: int = 8,
    progress: bool = False,
) -> dict[str, float]:
    """``{"ce": mean cross-entropy in nats, "ppl": exp(ce), "n_predictions": count}`` over ``blocks``."""
    total, count = 0.0, 0
    for start in tqdm(range(0, len(blocks), batch_blocks), desc="perplexity", disable=not progress, leave=False):
        ids = blocks[start : start + batch_blocks].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        keep = ~special_mask(ids[:, :-1], tokenizer)
        losses = F.cross_entropy(logits[keep], ids[:, 1:][keep], reduction="sum")
        total += float(losses.double())
        count += int(keep.sum())
    if count == 0:
        raise ValueError("no predictions to score: every eval token is a special token")
    ce = total / count
    return {"ce": ce, "ppl": math.exp(ce), "n_predictions": count}
