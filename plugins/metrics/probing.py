"""Concept-level metrics (docs/METRICS.md, "Concept-level evals"): does the SAE's latents still carry the concepts
of labelled texts on the scored model? SAEBench's sparse probing and TPP (``saex.analysis.probing``, in parity with
SAEBench 0.6.0's own functions: benchmarks/saebench_parity.py), on the model's activations at the hook for the
texts of the ``labelled_sets`` the params name, each text mean-pooled over its real tokens.

- ``sparse-probing``: per set, one-vs-rest probes per class on equal-size negatives; ``sae_top_{k}_test_accuracy``
  from the k latents with the largest |mean+ - mean-| on the train texts (sklearn LogisticRegression), the same
  on the model's raw activations as the ceiling (``llm_top_{k}_test_accuracy``), and SAEBench's full-width probes
  (``sae_test_accuracy``, ``llm_test_accuracy``); averaged over classes, then sets. On a compressed model also
  ``sae_top_{k}_transfer_accuracy``: latents and probe chosen on M's latents of the train texts, tested on M_c's
  latents of the test texts (how much of each concept's probe survives compression), and the same for the model.
- ``tpp``: targeted probe perturbation: per class, ablate the n latents with the largest effect on its probe
  (error term kept, on pooled activations: exact for a linear probe) and measure how much that class's probe
  accuracy drops against the others' (``tpp_threshold_{n}_total_metric``, ``_intended_diff_only``,
  ``_unintended_diff_only``); averaged over classes, then sets. Not defined for an SAE with a per-token layer norm
  (ablation is then not linear in the latents): absent, with the reason in the details.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from pydantic import BaseModel, ConfigDict, Field

from saex import (
    SPARSE_PROBING_KS,
    TPP_NS,
    BootstrapParams,
    LabelledActivations,
    Metric,
    MetricContext,
    MetricOutput,
    accuracy_intervals,
    hookimpl,
    sparse_probing,
    sparse_probing_transfer,
    tpp,
    with_uncertainty,
)


class ProbingParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    labelled_sets: list[str] = Field(min_length=1, description="labelled_sets entries whose texts are probed")
    seed: int = Field(42, description="seed of the balanced samples and probes (SAEBench's random_seed)")


class SparseProbingParams(ProbingParams):
    ks: tuple[int, ...] = Field(SPARSE_PROBING_KS, description="sizes k of the sparse probes")
    resamples: int = Field(1000, gt=0, description="bootstrap resamples of the test texts (intervals of top-k)")
    confidence: float = Field(0.95, gt=0, lt=1, description="confidence level of the intervals")


class TPPParams(ProbingParams):
    ns: tuple[int, ...] = Field((2, 5, 10, 20), description="numbers n of ablated latents (SAEBench: 2..500)")


def _accuracy(name: str, what: str, order: int, **extra: object) -> MetricOutput:
    return MetricOutput(
        name=name,
        description=what,
        aggregation="mean over classes, then labelled sets (balanced test texts)",
        higher_is_better=True,
        range=(0, 1),
        order=order,
        **extra,
    )


def _pooled(ctx: MetricContext, name: str) -> tuple[LabelledActivations, torch.Tensor, torch.Tensor]:
    """The set's texts on the scored model: (their data, pooled activations [n_texts, d], pooled latents)."""
    data = ctx.labelled(name)
    return data, data.pooled(ctx.device), data.pooled_codes(ctx.sae.encode, ctx.device, ctx.batch_size)


def _named(prefix: str, key: str) -> str:
    """The stored key: ``llm_`` or ``sae_`` before it; M's probes tested on M_c (``sae_transfer``) as ``_transfer_``."""
    base, _, transfer = prefix.partition("_")
    return f"{base}_{key.replace('test', 'transfer') if transfer else key}"


def _mean(values: list[dict[str, float]]) -> dict[str, float]:
    return {key: sum(v[key] for v in values) / len(values) for key in values[0]}


ACCURACIES = (
    *(
        _accuracy(f"sae_top_{k}_test_accuracy", f"probe on the SAE's {k} most class-separating latents", 300 + k)
        for k in SPARSE_PROBING_KS
    ),
    *(
        _accuracy(f"llm_top_{k}_test_accuracy", f"probe on the model's {k} most class-separating dimensions", 310 + k)
        for k in SPARSE_PROBING_KS
    ),
    _accuracy("sae_test_accuracy", "full-width probe on all the SAE's latents (SAEBench's torch probe)", 320),
    _accuracy("llm_test_accuracy", "full-width probe on the model's activations: the ceiling", 321),
    *(
        _accuracy(
            f"sae_top_{k}_transfer_accuracy",
            f"compressed model only: {k}-latent probe chosen and fitted on M, tested on M_c's latents",
            330 + k,
        )
        for k in SPARSE_PROBING_KS
    ),
    *(
        _accuracy(
            f"llm_top_{k}_transfer_accuracy",
            f"compressed model only: {k}-dimension probe fitted on M's activations, tested on M_c's",
            340 + k,
        )
        for k in SPARSE_PROBING_KS
    ),
)
# the top-k accuracies carry percentile-bootstrap intervals over the test texts (``accuracy_intervals``)
SPARSE_PROBING_OUTPUTS = tuple(
    o.model_copy(update={"aggregation": "percentile bootstrap over the test texts"})
    if o.name.endswith("_high") or o.name.endswith("_low")
    else o
    for o in with_uncertainty(ACCURACIES, [o.name for o in ACCURACIES if "_top_" in o.name], ())
)


class SparseProbing:
    name = "sparse-probing"
    description = "SAEBench sparse probing on labelled texts: top-k latents vs the model's activations, and transfer"
    scope = "sae"
    Params = SparseProbingParams
    outputs = SPARSE_PROBING_OUTPUTS

    def compute(self, ctx: MetricContext, params: SparseProbingParams) -> dict[str, float]:
        if ctx.labelled is None:
            return {}
        per_set, outcomes, n_test = {}, [], []
        for name in params.labelled_sets:
            data, x, f = _pooled(ctx, name)
            train, test, labels = data.train, data.test, data.labels
            gen = torch.Generator().manual_seed(params.seed)  # the SAE's run follows the model's, as in SAEBench
            runs = {
                "llm": sparse_probing(x[train], labels[train], x[test], labels[test], params.ks, gen),
                "sae": sparse_probing(f[train], labels[train], f[test], labels[test], params.ks, gen),
            }
            if ctx.reference_labelled is not None:
                reference = ctx.reference_labelled(name)
                x_m = reference.pooled(ctx.device)
                f_m = reference.pooled_codes(ctx.sae.encode, ctx.device, ctx.batch_size)
                for prefix, on_m, on_mc in (("llm", x_m, x), ("sae", f_m, f)):
                    moved = sparse_probing_transfer(
                        on_m[train], labels[train], on_mc[test], labels[test], params.ks, params.seed
                    )
                    runs[f"{prefix}_transfer"] = moved
            found, probes = {}, {}
            for prefix, run in runs.items():
                found |= {_named(prefix, k): v for k, v in run.items() if k not in ("per_class", "outcomes")}
                probes |= {_named(prefix, k): v for k, v in run["outcomes"].items()}
            per_set[name] = found
            outcomes.append(probes)
            n_test.append(len(test))
        ctx.details["sparse_probing"] = per_set
        values = _mean(list(per_set.values()))
        resampling = BootstrapParams(resamples=params.resamples, confidence=params.confidence, seed=params.seed)
        for key, (low, high) in accuracy_intervals(outcomes, n_test, resampling).items():
            values[key + "_ci_low"], values[key + "_ci_high"] = low, high
        return values


class TPP:
    name = "tpp"
    description = "SAEBench targeted probe perturbation on labelled texts: ablating a class's latents hurts only it"
    scope = "sae"
    Params = TPPParams
    outputs = tuple(
        MetricOutput(
            name=f"tpp_threshold_{n}_{part}",
            description=what.format(n=n),
            aggregation="mean over classes, then labelled sets",
            higher_is_better=better,
            range=(-1, 1),
            order=350 + i,
        )
        for i, n in enumerate(TPP_NS)
        for part, what, better in (
            (
                "total_metric",
                "accuracy drop of a class's probe minus the others' after ablating its top {n} latents",
                True,
            ),
            ("intended_diff_only", "accuracy drop of the class's own probe after ablating its top {n} latents", True),
            ("unintended_diff_only", "mean accuracy drop of the other classes' probes (ablating {n} latents)", False),
        )
    )

    def compute(self, ctx: MetricContext, params: TPPParams) -> dict[str, float]:
        if ctx.labelled is None:
            return {}
        if bool(ctx.sae.layer_norm):
            ctx.details["tpp"] = "not computed: the SAE layer-normalises each token, so ablation is not linear"
            return {}
        ns = [n for n in params.ns if n <= ctx.sae.d_sae]
        w_dec = (ctx.sae.W_dec.detach().float() / ctx.sae.norm_scale.float()).cpu()  # model units
        per_set = {}
        for name in params.labelled_sets:
            data, x, f = _pooled(ctx, name)
            train, test, labels = data.train, data.test, data.labels
            means, _ = tpp(x[train], f[train], labels[train], x[test], f[test], labels[test], w_dec, ns, params.seed)
            per_set[name] = means
        ctx.details["tpp"] = per_set
        return _mean(list(per_set.values()))


@hookimpl
def register_metrics(register: Callable[[Metric], None]) -> None:
    register(SparseProbing())
    register(TPP())
