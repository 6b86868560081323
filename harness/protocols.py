"""One Protocol per plugin kind. Each component has a ``name``, a pydantic ``Params`` model (registry params
are validated against it) and a one-line ``description`` shown by ``saex plugins``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Protocol, runtime_checkable

import torch
from pydantic import BaseModel

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from harness.sae import SAE


class Component(Protocol):
    name: str
    description: str
    Params: type[BaseModel]


# --- data handed to plugins -------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """An HF causal LM ready for use, with what identifies its weights."""

    model: "PreTrainedModel"
    tokenizer: "PreTrainedTokenizerBase"
    fingerprint: str  # hash of what determines the weights (path + file hashes, or config + seed)


@runtime_checkable
class ActivationSource(Protocol):
    """Activations of one hook point, read as float32 batches of shape [batch, d_in] on CPU.

    Special-token positions (BOS, EOS, PAD, ...) are never included.
    """

    d_in: int
    n_tokens: int

    def iter_batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0) -> Iterator[torch.Tensor]:
        """Yield every token once, in order or in a seeded permutation; the last batch may be short."""
        ...


@dataclass
class CompressionContext:
    """What a compressor may use: calibration token blocks [n_blocks, block_len] (calibration split,
    never eval), the tokenizer, the device and a seed."""

    calibration_tokens: torch.Tensor
    tokenizer: "PreTrainedTokenizerBase"
    device: torch.device
    seed: int = 0
    workdir: str | None = None  # scratch directory for methods that must save the model (llm-compressor)


@dataclass
class CompressionExpectation:
    """What a compression promises, checked layer by layer after it ran (harness.verify)."""

    sparsity: float | None = None  # fraction of zero weights in every targeted Linear layer
    tolerance: float = 0.01
    targets: list[str] = field(default_factory=list)  # qualified module names that must have been touched


@dataclass
class MetricContext:
    """Everything a metric may read for one scored SAE."""

    sae: "SAE"
    eval_activations: ActivationSource
    device: torch.device
    batch_size: int = 4096


# --- plugin kinds ----------------------------------------------------------------------------------------


class ModelSource(Component, Protocol):
    def load(self, params: BaseModel, device: torch.device) -> LoadedModel:
        """Return the model in eval mode on ``device`` (float32) with its tokenizer."""
        ...


class Corpus(Component, Protocol):
    def documents(self, params: BaseModel) -> Iterator[str]:
        """Yield documents in a fixed, deterministic order."""
        ...

    def fingerprint(self, params: BaseModel) -> str:
        """Hash of what determines the documents (file hashes, dataset name and revision)."""
        ...


class Compressor(Component, Protocol):
    def compress(self, model: "PreTrainedModel", params: BaseModel, ctx: CompressionContext) -> "PreTrainedModel":
        """Compress ``model`` (in place where possible) and return the compressed model."""
        ...

    def expectation(self, model: "PreTrainedModel", params: BaseModel) -> CompressionExpectation:
        """What ``compress`` promises for this model, checked after it ran."""
        ...


class SAEArchitecture(Component, Protocol):
    def build(self, d_in: int, params: BaseModel, *, seed: int = 0) -> "SAE":
        """A freshly initialised SAE for inputs of width ``d_in``."""
        ...


class SAEPruner(Component, Protocol):
    def prune(self, sae: "SAE", params: BaseModel, calibration: ActivationSource, sparsity: float) -> "SAE":
        """Return a pruned copy of ``sae`` calibrated on ``calibration`` (activations of the compressed model)."""
        ...


class Metric(Component, Protocol):
    def compute(self, ctx: MetricContext, params: BaseModel) -> dict[str, float]:
        """Flat dict of metric name -> value."""
        ...


class NoParams(BaseModel):
    """For components without parameters: any key given in the registry is an error."""

    model_config = {"extra": "forbid"}

