"""What the spine records with every cell, declared the way metrics declare theirs (``MetricOutput``), so the
report reads declarations and names no key: the scored model's next-token loss (in ``metrics``), the cost of
obtaining the SAE (in ``cost``) and the achieved sparsity of a pruned SAE (in ``details["pruning"]["achieved"]``,
``saex.sae.sparsity``). ``declared_outputs`` joins the loaded metrics' declarations with the model loss."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from saex.plugin.manager import PluginError, Plugins
from saex.plugin.protocols import MetricOutput

ONE_RUN = "one run"

MODEL_LOSS = (
    MetricOutput(
        name="model_ce",
        description="next-token cross-entropy of the scored model on the whole eval split (no SAE)",
        aggregation="mean over eval tokens",
        unit="nats",
        higher_is_better=False,
        range=(0, None),
        headline=True,
        order=90,
    ),
    MetricOutput(
        name="model_ppl",
        description="perplexity of the scored model: exp(model_ce)",
        aggregation="exp of the mean over eval tokens",
        higher_is_better=False,
        range=(1, None),
    ),
)

COST = (
    MetricOutput(
        name="sae_seconds",
        description="seconds to obtain the SAE: training (original, retrained), fine-tuning (finetuned:*), "
        "loading (loaded:*), or calibration + pruning (pruned:*)",
        aggregation=ONE_RUN,
        unit="s",
        higher_is_better=False,
        range=(0, None),
    ),
    MetricOutput(
        name="sae_tokens",
        description="activation tokens the SAE was trained, fine-tuned or calibrated on",
        aggregation="count",
        higher_is_better=False,
        range=(0, None),
    ),
    MetricOutput(
        name="prune_seconds",
        description="pruned:* only: seconds of calibration + pruning, the original's training not included",
        aggregation=ONE_RUN,
        unit="s",
        higher_is_better=False,
        range=(0, None),
    ),
    MetricOutput(
        name="calibration_tokens",
        description="pruned:* only: calibration tokens of the compressed model",
        aggregation="count",
        higher_is_better=False,
        range=(0, None),
    ),
    MetricOutput(
        name="original_sae_seconds",
        description="pruned:* and finetuned:* only: training seconds of the original SAE they start from",
        aggregation=ONE_RUN,
        unit="s",
        higher_is_better=False,
        range=(0, None),
    ),
    MetricOutput(
        name="original_sae_tokens",
        description="finetuned:* only: training tokens of the original SAE it starts from",
        aggregation="count",
        higher_is_better=False,
        range=(0, None),
    ),
    MetricOutput(
        name="activation_seconds",
        description="seconds of the model pass that collected the activations the SAE was trained or calibrated "
        "on (shared by the hooks collected in the same pass)",
        aggregation=ONE_RUN,
        unit="s",
        higher_is_better=False,
        range=(0, None),
    ),
)

PRUNING_ACHIEVED = (
    MetricOutput(
        name="sparsity",
        description="1 - non-zero weights of W_enc and W_dec / weights of the original SAE's",
        aggregation="share of weights",
        range=(0, 1),
    ),
    *(
        MetricOutput(
            name=f"sparsity_{matrix}",
            description=f"exact zeros in {matrix} of the pruned SAE",
            aggregation="share of weights",
            range=(0, 1),
        )
        for matrix in ("W_enc", "W_dec")
    ),
    MetricOutput(name="d_sae", description="latents of the pruned SAE", aggregation="count", unit="latents"),
    MetricOutput(
        name="latents_removed",
        description="1 - d_sae / the original SAE's d_sae",
        aggregation="share of latents",
        range=(0, 1),
    ),
)


@dataclass(frozen=True)
class CostColumn:
    """A column of the report's cost tables: the first of ``keys`` a cell's cost holds, so a pruned SAE shows its
    own pruning cost, not the training cost of the SAE it was pruned from. ``output`` describes the column."""

    output: MetricOutput
    keys: tuple[str, ...]

    def value(self, cost: Mapping[str, float]) -> float | None:
        return next((float(cost[key]) for key in self.keys if key in cost), None)


def _column(name: str, label: str, keys: tuple[str, ...]) -> CostColumn:
    """A cost column described as its last key (the one every SAE source records) is, under ``name``, ``label``."""
    general = next(output for output in COST if output.name == keys[-1])
    return CostColumn(general.model_copy(update={"name": name, "label": label}), keys)


SECONDS_TO_OBTAIN = _column("seconds_to_obtain", "seconds to obtain", ("prune_seconds", "sae_seconds"))
TOKENS_TO_OBTAIN = _column("tokens_to_obtain", "tokens", ("calibration_tokens", "sae_tokens"))
ACTIVATION_SECONDS = _column("activation_seconds", "activation seconds", ("activation_seconds",))
COST_COLUMNS = (SECONDS_TO_OBTAIN, TOKENS_TO_OBTAIN, ACTIVATION_SECONDS)


def declared_outputs(plugins: Plugins) -> dict[str, MetricOutput]:
    """Every declared key of a cell's ``metrics``: each loaded metric's outputs (metrics by name), then the
    model loss. A key declared twice is a ``PluginError`` naming both owners, as a key returned twice is an
    error when scoring."""
    owners: dict[str, str] = {}
    found: dict[str, MetricOutput] = {}
    declared = [(name, plugins.get("metric", name).outputs) for name in plugins.names("metric")]
    for owner, outputs in [*declared, ("the spine (model loss)", MODEL_LOSS)]:
        for output in outputs:
            if not isinstance(output, MetricOutput):
                raise PluginError(f"metric {owner!r} declares {output!r}, not a saex.MetricOutput")
            if output.name in found:
                raise PluginError(f"output {output.name!r} is declared by both {owners[output.name]!r} and {owner!r}")
            owners[output.name], found[output.name] = owner, output
    return found
