"""lm-eval's numbers for a model with SAEs spliced in, for metric plugins (``saex.evaluate_tasks``). lm-eval
(seconds to import) loads only when a task runs, so importing ``saex`` stays light."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from saex.downstream.tasks import flatten

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase

    from saex.model.hookpoints import HookPoint
    from saex.sae.base import SAE


def evaluate_tasks(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    saes: Mapping[HookPoint, SAE],
    tasks: list[str],
    *,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
) -> dict[str, float]:
    """lm-eval's numbers for ``tasks`` on ``model`` with ``saes`` spliced in at their hooks (none: the bare
    model), flattened by ``flatten``; lm-eval's defaults otherwise, so they equal its own ``simple_evaluate``."""
    from saex.downstream.lmeval import SplicedLM, run_tasks

    lm = SplicedLM(pretrained=model, tokenizer=tokenizer, saes=saes, batch_size=batch_size)
    return flatten(run_tasks(lm, tasks, limit=limit, num_fewshot=num_fewshot)["results"])
