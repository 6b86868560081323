"""What a splice metric is handed (``saex.plugin.protocols.Metric.compute_spliced``): a scored model and hook, its
eval blocks and every SAE scored there, with the model's memo of prefix passes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from saex.model.hookpoints import HookPoint
from saex.model.splice import Prefixes
from saex.sae.base import SAE

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class SpliceContext:
    """Everything a splice metric reads: one scored model and hook, its eval token blocks, and every SAE
    scored there (label -> SAE), so the layers before the hook run once for all of them. ``mean_activation``
    [d] is the scored model's mean activation at the hook over its eval tokens (special tokens excluded; at
    most 100k of them, ``saex.sae.base.mean_activation``), for a mean-ablation baseline. ``reference_saes``: label ->
    the ``original`` SAE that label's paired differences are taken against (one of ``saes`` or not).
    ``progress``: whether to show a progress bar (the run's ``--no-progress`` turns it off). ``prefixes``: the
    model's memo of prefix passes, shared by every context on that model (the runner keeps one per model; by
    default a new one). ``clean_loss``: called by a metric that runs the clean model over whole eval blocks with
    (leading blocks covered, summed next-token CE, predictions), so the runner takes the model's loss from that
    pass instead of another one."""

    model: torch.nn.Module
    hook: HookPoint
    blocks: torch.Tensor
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    saes: dict[str, SAE]
    mean_activation: torch.Tensor | None = None
    reference_saes: dict[str, SAE] = field(default_factory=dict)
    progress: bool = False
    prefixes: Prefixes | None = None
    clean_loss: Callable[[int, float, int], None] | None = None

    def __post_init__(self) -> None:
        if self.prefixes is None:
            self.prefixes = Prefixes(self.model)

    def prefix(self, ids: torch.Tensor) -> torch.Tensor:
        """The residual stream entering the hook's layer for ``ids`` (``saex.model.splice.prefix``), memoized."""
        assert self.prefixes is not None
        return self.prefixes(ids, self.hook)
