"""One Protocol per plugin kind. Each component has a ``name``, a pydantic ``Params`` model (registry params
are validated against it) and a one-line ``description`` shown by ``saex plugins``."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import torch
from pydantic import BaseModel, Field, model_validator

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from saex.data.labelled import LabelledTexts
    from saex.model.labelled_activations import LabelledActivations
    from saex.run.job import Job
    from saex.sae.base import SAE, SAELensImport
    from saex.sae.splice_context import SpliceContext


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
    """What a compression promises, checked layer by layer after it ran (saex.model.verify)."""

    sparsity: float | None = None  # fraction of zero weights in every targeted Linear layer
    tolerance: float = 0.01
    targets: list[str] = field(default_factory=list)  # qualified module names that must have been touched
    # N:M sparsity: at most n non-zero weights in every group of m consecutive weights along the input dim
    n_m: tuple[int, int] | None = None
    # quantization: at most 2**bits distinct values in every quantization group of the dense weight
    bits: int | None = None
    group_size: int | None = None  # weights per group; None = one group per output row (per channel)
    group_axis: int = 1  # 1: groups run along the input dim of each row; 0: hqq's axis-0 layout (see verify)
    # the model is returned as it was (``none``): every Linear weight must be bit-equal to the original, and
    # the runner lets M_c share M's activations and SAEs instead of recomputing them
    unchanged: bool = False


@dataclass
class MetricContext:
    """Everything a per-SAE metric may read for one scored SAE.

    ``reference_activations`` are the base model's eval activations at the same hook, row-aligned with
    ``eval_activations`` (same tokens), when the SAE is scored on a compressed model; ``reference_sae`` is the
    ``original`` SAE when the scored SAE is another one (retrained, finetuned, pruned, ``original@seed=<n>``).
    ``eval_blocks`` [n_tokens] int64 is the eval block (row of the eval token blocks) each eval activation row
    comes from, in the order ``iter_batches`` yields them (``saex.data.corpus.row_blocks``): what bootstrap intervals
    resample; None when the rows come from no packed blocks (then metrics report no intervals).

    Two outputs besides the returned values: tensors [d_sae] a metric adds to ``per_latent`` are stored with the
    cell (safetensors in the cache, its key in the row's ``details["per_latent"]``, ``saex.analysis.latent_store``), and
    small JSON-able summaries it adds to ``details`` go into the row's ``details``.

    ``labelled(name)``: the scored model's activations at the hook on the texts of the ``labelled_sets`` entry
    ``name`` (one that the metric's params list under ``labelled_sets``), with their labels and train/test split;
    ``reference_labelled`` the same on the base model when the SAE is scored on a compressed one (same texts).
    """

    sae: "SAE"
    eval_activations: ActivationSource
    device: torch.device
    batch_size: int = 4096
    reference_activations: ActivationSource | None = None
    reference_sae: "SAE | None" = None
    eval_blocks: torch.Tensor | None = None
    labelled: "Callable[[str], LabelledActivations] | None" = None
    reference_labelled: "Callable[[str], LabelledActivations] | None" = None
    per_latent: dict[str, torch.Tensor] = field(default_factory=dict)
    details: dict[str, object] = field(default_factory=dict)


# --- model layouts (register_layouts) -----------------------------------------------------------------------


@dataclass(frozen=True)
class Requirement:
    """A config attribute the layout needs at a given value; any other value is refused with ``why``."""

    attribute: str
    value: object
    why: str


@dataclass(frozen=True)
class Layout:
    """Where a model family keeps its decoder blocks and what the hook points are on it (docs/MODELS.md).
    ``attn_out`` / ``mlp_out``: the modules inside a block whose outputs (first element) are what attention and
    the MLP add to the residual stream."""

    blocks: str  # dotted path from the causal LM to its ModuleList of decoder blocks
    attn_out: str  # dotted path, inside a block, of the module whose output is attn_out
    mlp_out: str  # likewise for mlp_out
    targets: str = r".*"  # regex (full match) of the block weights compressed by default, relative to a block
    tuple_output: bool = False  # a block returns (hidden_states, attention weights), not hidden_states
    requires: tuple[Requirement, ...] = ()


# --- plugin kinds ----------------------------------------------------------------------------------------


class ModelSource(Component, Protocol):
    def load(self, params: BaseModel, device: torch.device) -> LoadedModel:
        """Return the model in eval mode on ``device`` (float32) with its tokenizer."""
        ...


class LabelledParams(BaseModel):
    """What every labelled set's params hold besides its own: how many tokens of each text the model reads, and
    the deterministic stratified train/test split (``saex.data.labelled.train_test_split``)."""

    model_config = {"extra": "forbid"}

    max_tokens: int = Field(64, ge=2, description="tokens of each text the model reads (BOS included)")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="share of each class's texts in the test split")
    split_seed: int = Field(0, description="seed of the split (the same texts go to test for the same seed)")


class LabelledSet(Component, Protocol):
    """Labelled texts for the concept-level evals (registry section ``labelled_sets``); ``Params`` subclasses
    ``LabelledParams``."""

    def load(self, params: BaseModel) -> "LabelledTexts":
        """The texts with their labels (and second labels, for SCR), in a fixed order; raise
        ``saex.MissingDataPackage`` naming what to install when the data is not on this machine."""
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
    """Registered as its class, a ``saex.SAE`` subclass (``register(TopKSAE)``): ``name`` is also the
    ``architecture`` its saved cfg.json names, so what trains is what loads. The base class provides
    ``build`` and the SAELens hooks (an empty ``saelens_architectures`` opts out of SAELens import)."""

    saelens_architectures: tuple[str, ...]

    def build(self, d_in: int, params: BaseModel, *, seed: int = 0) -> "SAE":
        """A freshly initialised SAE for inputs of width ``d_in``."""
        ...

    def from_saelens(self, cfg: Mapping[str, Any], extra: dict[str, torch.Tensor]) -> "SAELensImport | None":
        """Params and extra state read from a SAELens file, or None when it is not this architecture's."""
        ...


class SAEPruner(Component, Protocol):
    def prune(self, sae: "SAE", params: BaseModel, calibration: ActivationSource, sparsity: float) -> "SAE":
        """Return a pruned copy of ``sae`` calibrated on ``calibration`` (activations of the compressed model)."""
        ...


class Executor(Component, Protocol):
    """Computes a matrix's pending cells, writing their rows to the store; ``saex.run.runner.Job`` is what it may
    use: the cells grouped as an artifact graph, and the steps that compute each part."""

    def execute(self, job: "Job", params: BaseModel) -> None: ...


class ExecutorError(RuntimeError):
    """An executor that cannot run where it was pointed (a cluster it cannot reach or join), or bad input its
    workers found: the message names what and what to check; ``saex run`` exits 2 with it."""


class MetricOutput(BaseModel):
    """One value a metric returns, declared so that the report (and anything reading the results) can label,
    order and place it without knowing the metric. ``name`` is its key in the returned dict.

    ``higher_is_better`` gives the column's arrow (None: neither, e.g. a count or a baseline); ``aggregation``
    says how per-token or per-latent values became one number. Where the report shows it: every output in the
    table of every cell; ``headline`` also in the per-(hook, compression) tables, ``gap`` in the transfer gap
    (M vs M_c), ``cost_quality`` in cost vs quality, ``vs_sparsity`` in a figure against the SAE's pruning
    sparsity. Columns sort by ``order``, then declaration order. ``note`` is a caveat printed as a footnote
    wherever the column appears; ``label`` a short column header (``name`` when absent). ``plotted_against``
    names other keys (of any metric) this output is drawn against, one point per cell, coloured by the scored
    model and marked by SAE source (e.g. a task's accuracy against the splice's kl_div_score). ``interval``
    names the keys (low, high) of its confidence interval: the report prints ``value ± half-width`` and no
    columns of their own. ``difference_of`` marks a paired difference of that key between the SAE and its
    original on the same tokens: the report marks it where its interval contains 0. ``noise_floor`` (an
    SAE-to-SAE comparison with ``original``): the report prints it beside the same value of the
    ``original@seed=<n>`` SAEs, the seed-to-seed noise floor. ``match_factor`` marks the SAEs' sparsity (L0):
    the report warns when SAEs it compares differ in it by more than this factor, and draws the
    ``cost_quality`` outputs against it (the axis of a sparsity sweep).
    """

    model_config = {"frozen": True, "extra": "forbid"}

    name: str = Field(min_length=1)
    description: str = Field(min_length=1)
    aggregation: str = Field(min_length=1)
    higher_is_better: bool | None = None
    unit: str | None = None
    range: tuple[float | None, float | None] | None = None
    label: str | None = None
    headline: bool = False
    gap: bool = False
    cost_quality: bool = False
    vs_sparsity: bool = False
    plotted_against: tuple[str, ...] = ()
    order: int = 100
    note: str | None = None
    interval: tuple[str, str] | None = None
    difference_of: str | None = None
    noise_floor: bool = False
    match_factor: float | None = Field(None, gt=1)

    @model_validator(mode="after")
    def _range_is_ordered(self) -> MetricOutput:
        low, high = self.range or (None, None)
        if low is not None and high is not None and low > high:
            raise ValueError(f"range of {self.name!r} must be (low, high) with low <= high, got {self.range}")
        return self


class Metric(Component, Protocol):
    """A per-SAE metric (``scope = "sae"``) implements ``compute``; a metric that splices SAEs into the model
    (``scope = "splice"``) implements ``compute_spliced`` and is called once per (scored model, hook).

    ``outputs`` declares every key either method may return; the report shows an undeclared key too, as
    stored, but marks it as undeclared (no direction, unit or description known)."""

    scope: Literal["sae", "splice"]
    outputs: tuple[MetricOutput, ...]

    def compute(self, ctx: MetricContext, params: BaseModel) -> dict[str, float]:
        """Flat dict of metric name -> value."""
        ...

    def compute_spliced(self, ctx: "SpliceContext", params: BaseModel) -> dict[str, dict[str, float]]:
        """SAE label -> flat dict of metric name -> value."""
        ...


SCOPE_METHODS: dict[str, str] = {"sae": "compute", "splice": "compute_spliced"}
"""The one ``Metric`` method a metric of each ``scope`` implements (checked when the metric is registered)."""


class NoParams(BaseModel):
    """For components without parameters: any key given in the registry is an error."""

    model_config = {"extra": "forbid"}
