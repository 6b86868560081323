"""Metric declarations: every key a built-in metric returns is declared (and every declared key returned on a
case that has everything), the spine declares what it records, and bad declarations fail where they are read."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from saex import TPP_NS, MetricContext, MetricOutput, NoParams, SpliceContext, hookimpl
from saex.model.activations import TensorActivations
from saex.model.hookpoints import HookPoint
from saex.model.labelled_activations import LabelledActivations
from saex.plugin.manager import PluginError, load_plugins
from saex.plugins.metrics.downstream import CEKL
from saex.plugins.metrics.lm_eval import LmEval
from saex.plugins.metrics.probing import TPP, SparseProbing
from saex.plugins.metrics.reconstruction import Reconstruction
from saex.plugins.metrics.transfer import Transfer
from saex.plugins.sae.topk import TopKSAE
from saex.run.outputs import COST, COST_COLUMNS, MODEL_LOSS, PRUNING_ACHIEVED, declared_outputs
from saex.sae.sparsity import sae_sparsity


def names(outputs: tuple[MetricOutput, ...]) -> set[str]:
    return {output.name for output in outputs}


def topk(d_in: int, seed: int) -> TopKSAE:
    return TopKSAE.build(d_in, TopKSAE.Params(d_sae=4 * d_in, k=4, normalize_input=False), seed=seed).eval()


def sae_context(d_in: int = 8) -> MetricContext:
    """An SAE scored on 'M_c' against 'M' and against another SAE, on rows from 8 eval blocks: every per-SAE
    output has a value."""
    x = torch.randn(64, d_in, generator=torch.Generator().manual_seed(0))
    return MetricContext(
        topk(d_in, 0),
        TensorActivations(x + 0.1 * torch.randn(64, d_in, generator=torch.Generator().manual_seed(1))),
        torch.device("cpu"),
        batch_size=16,
        reference_activations=TensorActivations(x),
        reference_sae=topk(d_in, 1),
        eval_blocks=torch.arange(64) // 8,
    )


@pytest.mark.parametrize("metric", [Reconstruction(), Transfer()], ids=lambda m: m.name)
def test_a_per_sae_metric_returns_exactly_its_declared_keys(metric):
    returned = metric.compute(sae_context(), metric.Params())
    assert set(returned) == names(metric.outputs) and len(returned) == len(metric.outputs)


def labelled_context(d_in: int = 8) -> MetricContext:
    """``sae_context`` with a labelled set of 3 classes x 20 texts of 4 tokens each, whose class shifts one
    dimension of every token, read on 'M' and 'M_c' alike: every concept-level output has a value."""
    ctx = sae_context(d_in)
    labels = torch.arange(60) % 3
    tokens = torch.randn(240, d_in, generator=torch.Generator().manual_seed(2))
    tokens[:, 0] += 3.0 * labels.repeat_interleave(4).float()
    test = (torch.arange(60) % 5) == 0
    data = LabelledActivations(
        TensorActivations(tokens),
        torch.arange(60).repeat_interleave(4),
        labels,
        ("a", "b", "c"),
        torch.nonzero(~test).squeeze(1),
        torch.nonzero(test).squeeze(1),
    )
    ctx.labelled = ctx.reference_labelled = lambda name: data
    return ctx


@pytest.mark.parametrize(
    ("metric", "params"),
    [(SparseProbing(), {"labelled_sets": ["s"]}), (TPP(), {"labelled_sets": ["s"], "ns": list(TPP_NS)})],
    ids=lambda m: getattr(m, "name", ""),
)
def test_a_concept_level_metric_returns_exactly_its_declared_keys(metric, params):
    ctx = labelled_context()
    ctx.sae = topk(8, 0).__class__.build(8, TopKSAE.Params(d_sae=600, k=4, normalize_input=False), seed=0).eval()
    returned = metric.compute(ctx, metric.Params(**params))
    assert set(returned) == names(metric.outputs)
    assert set(ctx.details) == {metric.name.replace("-", "_")} and set(ctx.details[metric.name.replace("-", "_")]) == {
        "s"
    }


def test_the_splice_metric_returns_exactly_its_declared_keys(tiny_llama):
    d = tiny_llama.model.config.hidden_size
    ids = torch.randint(3, len(tiny_llama.tokenizer), (2, 16), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = tiny_llama.tokenizer.bos_token_id
    saes = {"a": topk(d, 0), "b": topk(d, 1)}
    args = (tiny_llama.model, HookPoint(1, "resid_post"), ids, tiny_llama.tokenizer, torch.device("cpu"), saes)
    originals = {"a": topk(d, 2), "b": saes["a"]}  # an original scored here too, and one that is not
    ctx = SpliceContext(*args, mean_activation=torch.zeros(d), reference_saes=originals)
    with_mean = CEKL().compute_spliced(ctx, CEKL.Params())
    assert {label: set(found) for label, found in with_mean.items()} == {
        "a": names(CEKL.outputs),
        "b": names(CEKL.outputs),
    }
    without_mean = CEKL().compute_spliced(SpliceContext(*args), CEKL.Params())["a"]
    assert set(without_mean) < names(CEKL.outputs) and "ce_loss_score_mean" not in without_mean


def test_the_spine_declares_the_pruned_sae_sparsity_it_records_and_the_keys_of_its_cost_columns():
    sae = topk(8, 0)
    assert set(sae_sparsity(sae, reference=topk(8, 1))) == names(PRUNING_ACHIEVED)
    assert {key for column in COST_COLUMNS for key in column.keys} <= names(COST)
    assert [column.value({"sae_seconds": 600.0, "prune_seconds": 3.0}) for column in COST_COLUMNS] == [3.0, None, None]


def test_declared_outputs_joins_every_loaded_metric_with_the_model_loss():
    outputs = declared_outputs(load_plugins(entry_points=False))
    probing = [*SparseProbing.outputs, *TPP.outputs]
    expected = [*Reconstruction.outputs, *Transfer.outputs, *CEKL.outputs, *LmEval().outputs, *probing, *MODEL_LOSS]
    assert set(outputs) == names(tuple(expected)) and len(outputs) == len(expected)
    assert outputs["ce_loss_score"].higher_is_better is True and outputs["model_ce"].unit == "nats"


class Echo:
    """A third-party metric declaring one key, under a name given per test."""

    description = "test: returns one value"
    scope = "sae"
    Params = NoParams

    def __init__(self, name: str, outputs: tuple) -> None:
        self.name, self.outputs = name, outputs

    def compute(self, ctx, params):
        return {output.name: 1.0 for output in self.outputs}


def plugin(*metrics: Echo) -> type:
    class Plugin:
        @staticmethod
        @hookimpl
        def register_metrics(register):
            for metric in metrics:
                register(metric)

    return Plugin


def test_a_key_declared_by_two_metrics_is_refused_naming_both():
    clash = MetricOutput(name="mse", description="mine", aggregation="sum")
    plugins = load_plugins([("mine", plugin(Echo("echo", (clash,))))], entry_points=False)
    with pytest.raises(PluginError, match="'mse' is declared by both 'echo' and 'reconstruction'"):
        declared_outputs(plugins)


def test_a_declaration_that_is_not_a_metric_output_is_refused():
    plugins = load_plugins([("mine", plugin(Echo("echo", ("mse",))))], entry_points=False)
    with pytest.raises(PluginError, match="metric 'echo' declares 'mse', not a saex.MetricOutput"):
        declared_outputs(plugins)


def test_a_metric_without_outputs_is_refused_at_registration():
    class Silent:
        name, description, scope, Params = "silent", "test: declares nothing", "sae", NoParams

        def compute(self, ctx, params):
            return {}

    with pytest.raises(PluginError, match="attribute 'outputs' is missing"):
        load_plugins([("silent", plugin(Silent()))], entry_points=False)


def test_a_declaration_checks_its_fields():
    with pytest.raises(ValidationError, match="low <= high"):
        MetricOutput(name="x", description="d", aggregation="sum", range=(1, 0))
    with pytest.raises(ValidationError):
        MetricOutput(name="x", description="d", aggregation="sum", direction="up")
    with pytest.raises(ValidationError):
        MetricOutput(name="", description="d", aggregation="sum")
