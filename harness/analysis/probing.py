"""SAEBench's concept-level evals on tensors: sparse probing, TPP, SCR and feature absorption.

The inputs are activations already collected: the model's activations x and the SAE's latents f per token, each
mean-pooled over a text's real tokens (``mean_pool``), plus the SAE's decoder ``w_dec`` [d_sae, d_model]. Each
function names the SAEBench 0.6.0 function (``sae_bench/...``) whose numbers it reproduces;
benchmarks/saebench_parity.py runs both on the same inputs.

Randomness: SAEBench draws its balanced samples, probe initialisations and batch orders from torch's global
generator, seeded once per SAE (``torch.manual_seed(random_seed)``, 42 by default). Here a ``seed`` (an int, or a
``torch.Generator`` to go on drawing from) is consumed in the same order, so ``seed=s`` gives the draws SAEBench makes
after ``torch.manual_seed(s)``. Classes are integer labels; ascending label order plays the part of the order of
SAEBench's per-class dicts.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score

from saex.analysis.bootstrap import Bootstrap, BootstrapParams

SPARSE_PROBING_KS = (1, 2, 5)  # SparseProbingEvalConfig.k_values
TPP_NS = (2, 5, 10, 20, 50, 100, 500)  # ScrAndTppEvalConfig.n_values
LETTERS = "abcdefghijklmnopqrstuvwxyz"  # absorption/vocab.py
ABSORPTION_TEMPLATE = "{word} has the first letter:"  # AbsorptionEvalConfig.prompt_template (token position -6)
_EPS = 1e-8  # feature_absorption_calculator.EPS: a main latent below this did not fire


def _generator(seed: int | torch.Generator) -> torch.Generator:
    return seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)


def _classes(labels: torch.Tensor) -> list[int]:
    return torch.unique(labels).tolist()


# ----- pooling and sampling -----


def mean_pool(acts: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over each text's real tokens: acts [n_texts, seq, d], mask [n_texts, seq] (True = real, False = BOS, EOS,
    padding) -> [n_texts, d].

    activation_collection.create_meaned_model_activations / get_sae_meaned_activations: SAEBench zeroes the special
    tokens' activations and divides the sum over all positions by the number of positions whose activations do not
    sum to exactly 0; with the mask given explicitly the two agree except for a real token whose activations sum to
    exactly 0, which SAEBench drops from the count.
    """
    mask = mask.to(torch.bool)
    summed = acts.masked_fill(~mask[:, :, None], 0.0).sum(dim=1)
    return summed / mask.sum(dim=1).to(acts.dtype)[:, None]


def balanced_one_vs_rest(
    labels: torch.Tensor, cls: int, seed: int | torch.Generator, paired: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``cls`` against as many other rows, shuffled: (row indices, targets 1 for ``cls`` and 0 for the rest).

    probe_training.prepare_probe_data: every row of ``cls`` is a positive; from each other class (ascending) a random
    ceil(n_pos / n_other_classes) of its rows, of which a random n_pos are kept; then the 2 * n_pos rows are shuffled.
    With ``paired`` (SCR, perform_scr=True) the negatives are a random n_pos of the rows of that one class instead.
    Raises ValueError when fewer than n_pos negatives exist (SAEBench's assertion).
    """
    gen = _generator(seed)
    positives = torch.nonzero(labels == cls).squeeze(1)
    n_pos = len(positives)
    if paired is None:
        others = [c for c in _classes(labels) if c != cls]
        per_class = math.ceil(n_pos / len(others))
        drawn = []
        for other in others:
            rows = torch.nonzero(labels == other).squeeze(1)
            drawn.append(rows[torch.randperm(len(rows), generator=gen)[:per_class]])
        negatives = torch.cat(drawn)
    else:
        negatives = torch.nonzero(labels == paired).squeeze(1)
    negatives = negatives[torch.randperm(len(negatives), generator=gen)[:n_pos]]
    if len(negatives) != n_pos:
        raise ValueError(f"class {cls}: {n_pos} positives but only {len(negatives)} negatives to balance them")
    rows = torch.cat([positives, negatives])
    targets = torch.zeros(len(rows), dtype=torch.int32)
    targets[:n_pos] = 1
    order = torch.randperm(len(rows), generator=gen)
    return rows[order], targets[order]


# ----- probes -----


@dataclass(frozen=True)
class ProbeFit:
    """A fitted binary linear probe, logit = x @ weight + bias: weight [d] and 0-d bias in the dtype they were fitted
    in (float32 here), and its accuracies on the train and test rows."""

    weight: torch.Tensor
    bias: torch.Tensor
    train_accuracy: float
    test_accuracy: float
    test_correct: torch.Tensor | None = None  # per test row, whether it was classified right (sklearn probes)


def top_k_mean_diff(train_x: torch.Tensor, train_y: torch.Tensor, k: int) -> torch.Tensor:
    """The k columns whose mean over positives differs most from their mean over negatives, |mean+ - mean-|, as a
    LongTensor, largest difference first.

    probe_training.get_top_k_mean_diff_mask, which ranks with ``torch.argsort(diff, descending=True)[:k]`` (not
    ``torch.topk``), the same call as here, so ties fall the same way.
    """
    positive = train_x[train_y == 1].mean(dim=0)
    negative = train_x[train_y == 0].mean(dim=0)
    return torch.argsort((positive - negative).abs(), descending=True)[:k]


def train_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    *,
    max_iter: int = 1000,
    C: float = 1.0,
    l1_ratio: float | None = None,
) -> ProbeFit:
    """sklearn logistic regression, configured as probe_training.train_sklearn_probe configures it.

    L2 penalty, C=1.0, max_iter=1000 (SAEBench raised it from 100), lbfgs, tol=1e-4, an intercept, no class weights,
    inputs cast to float32. With ``l1_ratio`` SAEBench's elastic net: the saga solver with that l1 ratio (saga is
    randomised, so that fit is not reproducible run to run). sklearn 1.8 deprecated ``penalty``; the L2 default and
    ``l1_ratio`` with saga are the same fits as SAEBench's ``penalty="l2"`` and ``penalty="elasticnet"``.
    """
    x_train = train_x.to(torch.float32).cpu().numpy()
    x_test = test_x.to(torch.float32).cpu().numpy()
    y_train = train_y.cpu().numpy()
    y_test = test_y.cpu().numpy()
    if l1_ratio is None:
        probe = LogisticRegression(C=C, max_iter=max_iter)
    else:
        probe = LogisticRegression(C=C, l1_ratio=l1_ratio, solver="saga", max_iter=max_iter)
    probe.fit(x_train, y_train)
    return ProbeFit(
        weight=torch.from_numpy(probe.coef_[0].copy()),
        bias=torch.tensor(probe.intercept_[0]),
        train_accuracy=float(accuracy_score(y_train, probe.predict(x_train))),
        test_accuracy=float(accuracy_score(y_test, probe.predict(x_test))),
        test_correct=torch.from_numpy(probe.predict(x_test) == y_test),
    )


def probe_accuracy(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> float:
    """Share of rows whose logit x @ weight + bias is > 0 exactly when y is 1 (probe_training.test_probe_gpu,
    averaged in float32 as there)."""
    logits = F.linear(x, weight.to(x.dtype)[None], bias.to(x.dtype).reshape(1)).squeeze(-1)
    return ((logits > 0.0).long() == y).float().mean().item()


def train_torch_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    *,
    seed: int | torch.Generator,
    batch_size: int,
    epochs: int,
    lr: float,
    l1_penalty: float | None = None,
    early_stopping_patience: int = 10,
) -> ProbeFit:
    """A logistic probe trained with AdamW (probe_training.train_probe_gpu): nn.Linear's initialisation, each epoch a
    random order in batches of ``batch_size``, mean BCE-with-logits plus ``l1_penalty`` * sum |weight|; after each
    epoch the test accuracy, keeping the epoch with the best (strictly better than all before; SAEBench selects on the
    test rows) and stopping after ``early_stopping_patience`` epochs without one.

    SAEBench's settings: sparse probing's full-width probe batch_size=250, epochs=100, lr=1e-2, patience 10, no L1;
    the TPP/SCR probes batch_size=16, epochs=20, lr=1e-3, l1_penalty=1e-3, patience 20 (``TPP_PROBE``).
    """
    gen = _generator(seed)
    dtype = train_x.dtype
    dim = train_x.shape[1]
    weight = torch.empty(1, dim, dtype=dtype)
    torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=gen)
    bias = torch.empty(1, dtype=dtype).uniform_(-1 / math.sqrt(dim), 1 / math.sqrt(dim), generator=gen)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    optimizer = torch.optim.AdamW([weight, bias], lr=lr)
    best_accuracy, best, stale = 0.0, None, 0
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(len(train_x), generator=gen)
            for start in range(0, len(train_x), batch_size):
                rows = order[start : start + batch_size]
                logits = F.linear(train_x[rows], weight, bias).squeeze(-1)
                loss = F.binary_cross_entropy_with_logits(logits, train_y[rows].to(dtype))
                if l1_penalty is not None:
                    loss = loss + l1_penalty * weight.abs().sum()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            accuracy = probe_accuracy(test_x, test_y, weight.detach()[0], bias.detach()[0])
            if accuracy > best_accuracy:
                best_accuracy, best, stale = accuracy, (weight.detach()[0].clone(), bias.detach()[0].clone()), 0
            else:
                stale += 1
            if stale >= early_stopping_patience:
                break
    if best is None:
        raise ValueError("the probe never scored above 0 on the test rows")
    return ProbeFit(best[0], best[1], probe_accuracy(train_x, train_y, *best), best_accuracy)


FULL_WIDTH_PROBE: dict[str, Any] = {"batch_size": 250, "epochs": 100, "lr": 1e-2}  # sparse_probing/main.py
# scr_and_tpp/eval_config.py ScrAndTppEvalConfig: probe_train_batch_size, probe_epochs, probe_lr, probe_l1_penalty, ...
TPP_PROBE: dict[str, Any] = {
    "batch_size": 16,
    "epochs": 20,
    "lr": 1e-3,
    "l1_penalty": 1e-3,
    "early_stopping_patience": 20,
}


# ----- sparse probing -----


def sparse_probing(
    train_x: torch.Tensor,
    train_labels: torch.Tensor,
    test_x: torch.Tensor,
    test_labels: torch.Tensor,
    ks: Sequence[int] = SPARSE_PROBING_KS,
    seed: int | torch.Generator = 42,
) -> dict[str, Any]:
    """Sparse probing of one representation (pooled model activations or pooled SAE latents) on one dataset.

    sparse_probing/main.py run_eval_single_dataset: for each class a balanced one-vs-rest probe on all columns
    (``train_torch_probe`` with ``FULL_WIDTH_PROBE``: SAEBench's ``llm_test_accuracy`` / ``sae_test_accuracy``), then
    for each k and class a fresh balanced sample, the k columns of ``top_k_mean_diff`` on its train rows (kept in
    column order, as SAEBench's mask does) and ``train_probe`` on them (``{llm,sae}_top_{k}_test_accuracy``). Returns
    ``test_accuracy`` and ``top_{k}_test_accuracy`` averaged over classes (plain mean, as SAEBench), and under
    ``per_class`` the same keys mapping class -> accuracy. ``seed`` stands for ``torch.manual_seed`` just before; in
    SAEBench the SAE's run follows the model's on one generator, so pass the generator on for that.
    """
    gen = _generator(seed)
    classes = _classes(train_labels)
    per_class: dict[str, dict[int, float]] = {"test_accuracy": {}}
    for cls in classes:
        train_rows, train_y = balanced_one_vs_rest(train_labels, cls, gen)
        test_rows, test_y = balanced_one_vs_rest(test_labels, cls, gen)
        fit = train_torch_probe(train_x[train_rows], train_y, test_x[test_rows], test_y, seed=gen, **FULL_WIDTH_PROBE)
        per_class["test_accuracy"][cls] = fit.test_accuracy
    top_k, outcomes = _top_k_per_class(train_x, train_labels, test_x, test_labels, ks, gen)
    per_class |= top_k
    result: dict[str, Any] = {key: sum(accs.values()) / len(accs) for key, accs in per_class.items()}
    result["per_class"] = per_class
    result["outcomes"] = outcomes
    return result


def sparse_probing_transfer(
    train_x: torch.Tensor,
    train_labels: torch.Tensor,
    test_x: torch.Tensor,
    test_labels: torch.Tensor,
    ks: Sequence[int] = SPARSE_PROBING_KS,
    seed: int | torch.Generator = 42,
) -> dict[str, Any]:
    """Sparse probes chosen and fitted on one representation and tested on another of the same texts: ``train_x``
    the train texts on M (an SAE's pooled latents, or the model's pooled activations), ``test_x`` the test texts on
    M_c. Per k and class, as in ``sparse_probing``'s top-k loop: a balanced one-vs-rest sample, the k columns of
    ``top_k_mean_diff`` and a ``train_probe`` on M's train rows, its accuracy on M_c's test rows. How much of each
    concept's probe survives compression, which no SAEBench eval asks: ``top_{k}_test_accuracy`` averaged over
    classes, and under ``outcomes`` each probe's test rows and whether it got each right (``accuracy_intervals``)."""
    per_class, outcomes = _top_k_per_class(train_x, train_labels, test_x, test_labels, ks, _generator(seed))
    result: dict[str, Any] = {key: sum(accs.values()) / len(accs) for key, accs in per_class.items()}
    result["outcomes"] = outcomes
    return result


def _top_k_per_class(
    train_x: torch.Tensor,
    train_labels: torch.Tensor,
    test_x: torch.Tensor,
    test_labels: torch.Tensor,
    ks: Sequence[int],
    gen: torch.Generator,
) -> tuple[dict[str, dict[int, float]], dict[str, dict[int, Outcome]]]:
    """``top_{k}_test_accuracy`` -> class -> accuracy: per k and class a fresh balanced sample, the k columns of
    ``top_k_mean_diff`` on its train rows (in column order, as SAEBench's mask keeps them) and ``train_probe``; and
    the same keys -> class -> the probe's ``Outcome`` on its test rows."""
    per_class: dict[str, dict[int, float]] = {}
    outcomes: dict[str, dict[int, Outcome]] = {}
    for k in ks:
        key = f"top_{k}_test_accuracy"
        per_class[key], outcomes[key] = {}, {}
        for cls in _classes(train_labels):
            train_rows, train_y = balanced_one_vs_rest(train_labels, cls, gen)
            test_rows, test_y = balanced_one_vs_rest(test_labels, cls, gen)
            kept = top_k_mean_diff(train_x[train_rows], train_y, k).sort().values
            fit = train_probe(train_x[train_rows][:, kept], train_y, test_x[test_rows][:, kept], test_y)
            per_class[key][cls] = fit.test_accuracy
            assert fit.test_correct is not None
            outcomes[key][cls] = Outcome(tuple(test_rows.tolist()), tuple(fit.test_correct.tolist()))
    return per_class, outcomes


@dataclass(frozen=True)
class Outcome:
    """One probe on its balanced test sample: the test rows (indices of texts, a text may appear once) and
    whether the probe classified each right."""

    rows: tuple[int, ...]
    correct: tuple[bool, ...]


def accuracy_intervals(
    outcomes: Sequence[Mapping[str, Mapping[int, Outcome]]], n_test: Sequence[int], params: BootstrapParams
) -> dict[str, tuple[float, float]]:
    """Percentile-bootstrap interval of each key's accuracy averaged over classes, then sets (``outcomes``: one
    mapping per labelled set, ``n_test`` its number of test texts): each set's test texts are resampled with
    replacement (``saex.analysis.bootstrap.Bootstrap`` with texts as the units), every class's accuracy is
    recomputed on its balanced sample with those weights, and the means are taken resample by resample. The probes
    stay as fitted: the interval is the spread from which texts were tested, not from refitting."""
    draws = [Bootstrap(n, params) for n in n_test]
    intervals = {}
    for key in outcomes[0]:
        per_set = []
        for boot, found in zip(draws, outcomes):
            accuracies = []
            for outcome in found[key].values():
                weights = boot.weights[:, list(outcome.rows)]
                correct = torch.tensor(outcome.correct, dtype=torch.float64)
                accuracies.append((weights * correct).sum(dim=1) / weights.sum(dim=1))
            per_set.append(torch.stack(accuracies).mean(dim=0))
        intervals[key] = draws[0].interval(torch.stack(per_set).mean(dim=0))
    return intervals


# ----- TPP and SCR -----


def latent_effects(
    latents: torch.Tensor, targets: torch.Tensor, probe_weight: torch.Tensor, w_dec: torch.Tensor, scr: bool = False
) -> torch.Tensor:
    """Each latent's effect on a class's probe, [d_sae], from pooled latents [n, d_sae] of a balanced sample.

    scr_and_tpp/main.py get_effects_per_class_precomputed_acts: effect_j = (mean f_j over positives - mean f_j over
    negatives) * (probe_weight . W_dec[j]), the probe's logit change per unit of the class-mean difference written
    through latent j. TPP clamps the mean difference at 0 first (only latents more active on the class); SCR takes
    |effect| with no clamp. Means are taken in float32.
    """
    dtype = latents.dtype
    positives = latents[targets == 1].to(torch.float32)
    negatives = latents[targets == 0].to(torch.float32)
    difference = (positives.sum(dim=0) / len(positives) - negatives.sum(dim=0) / len(negatives)).to(dtype)
    alignment = (probe_weight.to(dtype)[None] @ w_dec.to(dtype).T).squeeze(0)
    if not scr:
        difference = difference.clamp(min=0.0)
    effects = (difference * alignment).to(torch.float32)
    return effects.abs() if scr else effects


def top_n_latents(effects: torch.Tensor, n: int) -> torch.Tensor:
    """The latents to ablate: the n largest effects among the nonzero ones (fewer when fewer are nonzero), as a
    LongTensor (scr_and_tpp/main.py select_top_n_features, the same ``torch.topk``)."""
    if n > effects.numel():
        raise ValueError(f"n ({n}) is larger than the number of latents ({effects.numel()})")
    return torch.topk(effects, min(n, int((effects != 0).sum()))).indices


def ablate_pooled(
    pooled_x: torch.Tensor, pooled_f: torch.Tensor, w_dec: torch.Tensor, latent_ids: torch.Tensor
) -> torch.Tensor:
    """Pooled activations with latents ``latent_ids`` zero-ablated and the SAE's error term kept:
    x_ablated = x - sum over ablated j of f_j * W_dec[j], on [n, d] pooled x and [n, d_sae] pooled f.

    scr_and_tpp/main.py ablated_precomputed_activations, which per token takes decode(f with f_j = 0) + (x - decode(f))
    = x - sum_j f_j d_j (the decoder bias cancels) and then mean-pools. A linear probe sees only the pooled vector,
    and pooling is linear: mean over tokens of (x - f_j d_j) = mean(x) - mean(f_j) d_j, so ablating the pooled latents
    is the same. The one difference: SAEBench sums the ablated activations over special-token positions too (zeroed x
    but encode(0) not zeroed), so an SAE whose ablated latents fire on the zero vector shifts SAEBench's pooled
    vector by -f_j(0) d_j * n_special / n_real; pooled f here covers the real tokens only.
    """
    return pooled_x - pooled_f[:, latent_ids] @ w_dec[latent_ids]


def tpp_metrics(
    clean_accuracies: Mapping[int, float], ablated_accuracies: Mapping[int, Mapping[int, Mapping[int, float]]]
) -> tuple[dict[str, float], dict[int, dict[str, float]]]:
    """TPP from probe accuracies: clean_accuracies[c] is class c's probe on its balanced test sample;
    ablated_accuracies[a][n][c] the same after ablating class a's top-n latents.

    scr_and_tpp/main.py create_tpp_plotting_dict, per ablated class a and n: ``tpp_threshold_{n}_intended_diff_only``
    = clean[a] - ablated[a][n][a]; ``_unintended_diff_only`` = the mean over c != a of clean[c] - ablated[a][n][c];
    ``_total_metric`` = intended - unintended. Returns (means over classes, per-class values).
    """
    per_class: dict[int, dict[str, float]] = {}
    for cls, by_n in ablated_accuracies.items():
        metrics: dict[str, float] = {}
        for n, accuracies in by_n.items():
            intended = clean_accuracies[cls] - accuracies[cls]
            others = [clean_accuracies[c] - accuracies[c] for c in clean_accuracies if c != cls]
            unintended = sum(others) / len(others)
            metrics[f"tpp_threshold_{n}_total_metric"] = intended - unintended
            metrics[f"tpp_threshold_{n}_intended_diff_only"] = intended
            metrics[f"tpp_threshold_{n}_unintended_diff_only"] = unintended
        per_class[cls] = metrics
    keys = next(iter(per_class.values())).keys()
    means = {key: sum(m[key] for m in per_class.values()) / len(per_class) for key in keys}
    return means, per_class


def tpp(
    train_x: torch.Tensor,
    train_f: torch.Tensor,
    train_labels: torch.Tensor,
    test_x: torch.Tensor,
    test_f: torch.Tensor,
    test_labels: torch.Tensor,
    w_dec: torch.Tensor,
    ns: Sequence[int] = TPP_NS,
    seed: int | torch.Generator = 42,
) -> tuple[dict[str, float], dict[int, dict[str, float]]]:
    """Targeted probe perturbation on one dataset, from pooled activations x and pooled latents f of its texts.

    scr_and_tpp/main.py run_eval_single_dataset with perform_scr=False, in its order: per class a balanced
    ``train_torch_probe`` (``TPP_PROBE``) on x; the clean accuracies (get_probe_test_accuracy, a fresh balanced test
    sample per class); each class's ``latent_effects`` on a fresh balanced train sample; then per class a and n the
    accuracies of every class's probe on ``ablate_pooled`` test x with a's ``top_n_latents`` removed; ``tpp_metrics``.
    """
    gen = _generator(seed)
    classes = _classes(train_labels)
    probes = {}
    for cls in classes:
        train_rows, train_y = balanced_one_vs_rest(train_labels, cls, gen)
        test_rows, test_y = balanced_one_vs_rest(test_labels, cls, gen)
        probes[cls] = train_torch_probe(train_x[train_rows], train_y, test_x[test_rows], test_y, seed=gen, **TPP_PROBE)

    def accuracies(x: torch.Tensor) -> dict[int, float]:
        out = {}
        for cls in classes:
            rows, y = balanced_one_vs_rest(test_labels, cls, gen)
            out[cls] = probe_accuracy(x[rows], y, probes[cls].weight, probes[cls].bias)
        return out

    clean = accuracies(test_x)
    effects = {}
    for cls in classes:
        rows, y = balanced_one_vs_rest(train_labels, cls, gen)
        effects[cls] = latent_effects(train_f[rows], y, probes[cls].weight, w_dec)
    ablated = {
        cls: {n: accuracies(ablate_pooled(test_x, test_f, w_dec, top_n_latents(effects[cls], n))) for n in ns}
        for cls in classes
    }
    return tpp_metrics(clean, ablated)


def scr_metrics(
    *,
    target_probe_accuracy: float,
    spurious_probe_accuracy: float,
    biased_on_target: float,
    biased_on_spurious: float,
    ablated_biased_on_target: Mapping[int, float],
    ablated_biased_on_spurious: Mapping[int, float],
) -> dict[str, float]:
    """SCR's normalised accuracy recovery (scr_and_tpp/main.py get_scr_plotting_dict).

    In SAEBench's terms the target concept is the profession ("professor / nurse"), the spurious one the gender
    ("male / female") and the biased probe "male_professor / female_nurse". Arguments: the target probe on target data
    and the spurious probe on spurious data (clean); the biased probe on target data and on spurious data (clean);
    and, per n, the biased probe on target data after ablating the spurious probe's top-n latents (direction 1) and
    on spurious data after ablating the target probe's top-n latents (direction 2).

    ``scr_dir{1,2}_threshold_{n}`` = (ablated - biased) / (clean - biased), 0 when clean - biased < 0.001;
    ``scr_metric_threshold_{n}`` is direction 1 when the biased probe was worse on target than on spurious data,
    direction 2 when better, and absent on a tie (as in SAEBench).
    """
    directions = {
        1: (target_probe_accuracy, biased_on_target, ablated_biased_on_target),
        2: (spurious_probe_accuracy, biased_on_spurious, ablated_biased_on_spurious),
    }
    chosen = 1 if biased_on_target < biased_on_spurious else 2 if biased_on_target > biased_on_spurious else None
    results: dict[str, float] = {}
    for direction, (clean, original, ablated) in directions.items():
        for n, changed in ablated.items():
            score = 0.0 if clean - original < 0.001 else (changed - original) / (clean - original)
            results[f"scr_dir{direction}_threshold_{n}"] = score
            if direction == chosen:
                results[f"scr_metric_threshold_{n}"] = score
    return results


# ----- feature absorption -----


def is_alpha_word(token: str, allow_leading_space: bool = True) -> bool:
    """Whether a vocabulary entry (as text) is an absorption word: ASCII letters only, after at most one leading
    space (absorption/vocab.py get_alpha_tokens' filter)."""
    if allow_leading_space and token.startswith(" "):
        token = token[1:]
    return len(token) > 0 and all(char in LETTERS or char in LETTERS.upper() for char in token)


def _first_alpha(word: str) -> str:
    return next(char for char in word.strip() if char.isalpha())


def first_letter_index(word: str) -> int:
    """The word's class: index in ``LETTERS`` of its first alphabetic character, ignoring case and leading space
    (absorption/prompting.py first_letter, as probing.create_dataset_probe_training's answer_class_fn reads it)."""
    return LETTERS.index(_first_alpha(word).lower())


def icl_prompt(
    word: str,
    examples: Sequence[str],
    rng: random.Random,
    template: str = ABSORPTION_TEMPLATE,
    max_icl_examples: int | None = 10,
    separator: str = "\n",
    prepend_separator: bool = True,
) -> str:
    """The few-shot prompt whose last token's activations are read (absorption/prompting.py create_icl_prompt with
    FeatureAbsorptionCalculator's settings): ``max_icl_examples`` examples drawn with ``rng.sample`` until the word
    is not among them (at most 1000 draws), each as the template plus " " and its capitalised first letter, joined by
    the separator, then the word's template; a leading separator when ``prepend_separator``. SAEBench draws from the
    global ``random`` module; ``random.Random(s)`` gives its draws after ``random.seed(s)``."""
    count = len(examples) if max_icl_examples is None else max_icl_examples
    for _ in range(1000):
        chosen = rng.sample(list(examples), count)
        if word not in chosen:
            break
    else:
        raise ValueError(f"could not draw {count} examples without {word!r} in 1000 attempts")
    shots = [template.format(word=ex) + " " + _first_alpha(ex).upper() for ex in chosen]
    base = separator.join(shots) + separator + template.format(word=word)
    return separator + base if prepend_separator else base


def train_multi_probe(
    x: torch.Tensor,
    labels: torch.Tensor,
    n_classes: int,
    *,
    seed: int | torch.Generator,
    batch_size: int,
    num_epochs: int,
    lr: float = 1e-2,
    end_lr: float = 1e-5,
    weight_decay: float = 1e-6,
    l1_decay: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One-vs-rest logistic probes for ``n_classes`` classes at once: (weight [n_classes, d], bias [n_classes]).

    absorption/probing.py train_multi_probe: nn.Linear's initialisation, Adam with ``weight_decay`` and the learning
    rate decayed exponentially from ``lr`` to ``end_lr`` over the epochs, a DataLoader's shuffled batches, BCE with
    logits weighted per class by n_negative / n_positive, plus ``l1_decay`` * mean over classes of sum |w|.
    SAEBench's two uses: the ground-truth letter probe on model activations (probing.train_linear_probe_for_task via
    common.train_and_save_probes: batch_size=64, num_epochs=50, weight_decay=1e-4) and the L1 probe on SAE latents
    that picks the k-sparse features (k_sparse_probing.train_sparse_multi_probe: batch_size=4096, num_epochs=50,
    l1_decay=0.01, weight_decay=1e-6).
    """
    gen = _generator(seed)
    dtype = x.dtype
    targets = F.one_hot(labels, n_classes).to(dtype)
    positives = targets.sum(dim=0)
    pos_weight = (len(targets) - positives) / positives
    dim = x.shape[1]
    weight = torch.empty(n_classes, dim, dtype=dtype)
    torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=gen)
    bias = torch.empty(n_classes, dtype=dtype).uniform_(-1 / math.sqrt(dim), 1 / math.sqrt(dim), generator=gen)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    optimizer = torch.optim.Adam([weight, bias], lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=math.exp(math.log(end_lr / lr) / num_epochs))
    with torch.enable_grad():
        for _ in range(num_epochs):
            # A shuffling DataLoader draws twice from the global generator per epoch (its iterator's base seed, then
            # the RandomSampler's seed) and orders the rows with a generator seeded by the second draw.
            torch.empty((), dtype=torch.int64).random_(generator=gen)
            sampler_seed = int(torch.empty((), dtype=torch.int64).random_(generator=gen).item())
            order = torch.randperm(len(x), generator=torch.Generator().manual_seed(sampler_seed))
            for start in range(0, len(x), batch_size):
                rows = order[start : start + batch_size]
                logits = F.linear(x[rows], weight, bias)
                loss = F.binary_cross_entropy_with_logits(logits, targets[rows], pos_weight=pos_weight)
                if l1_decay:
                    loss = loss + l1_decay * weight.abs().sum(dim=-1).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            scheduler.step()
    return weight.detach(), bias.detach()


@dataclass(frozen=True)
class KSparseProbe:
    """A letter's probe on k SAE latents: score = latents[:, feature_ids] @ weight + bias (float32)."""

    feature_ids: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor

    def score(self, latents: torch.Tensor) -> torch.Tensor:
        """The probe's logits for latents [n, d_sae] (k_sparse_probing.KSparseProbe.forward)."""
        return latents[:, self.feature_ids].float() @ self.weight + self.bias


def k_sparse_probes(
    latents: torch.Tensor, labels: torch.Tensor, l1_weight: torch.Tensor, ks: Sequence[int]
) -> dict[int, dict[int, KSparseProbe]]:
    """probes[k][letter]: for each k and each letter present in ``labels``, the k latents with the largest (signed:
    only latents that predict the letter) weight in the L1 probe ``l1_weight`` [n_classes, d_sae], then sklearn
    ``LogisticRegression(max_iter=500, class_weight="balanced")`` on them, letter against all other words
    (k_sparse_probing.train_k_sparse_probes; SAEBench's ks are 1..max_k_value=10)."""
    y = labels.cpu().numpy()
    probes: dict[int, dict[int, KSparseProbe]] = {}
    for k in ks:
        probes[k] = {}
        for letter in _classes(labels):
            ids = l1_weight[letter].topk(k).indices
            fit = LogisticRegression(max_iter=500, class_weight="balanced")
            fit.fit(latents[:, ids].float().cpu().numpy(), (y == letter).astype(np.int64))
            probes[k][letter] = KSparseProbe(
                ids, torch.tensor(fit.coef_[0]).float(), torch.tensor(fit.intercept_[0]).float()
            )
    return probes


def binary_f1(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """F1 of predicting ``targets`` by score > 0 (k_sparse_probing.build_metrics_df's f1_probe and
    f1_sparse_sae_{k}; 0 where sklearn warns of an undefined F1)."""
    return float(f1_score(targets.cpu().numpy(), (scores > 0.0).cpu().numpy(), zero_division=0.0))


def split_features(
    f1_by_k: Mapping[int, float], feature_ids_by_k: Mapping[int, Sequence[int]], f1_jump_threshold: float = 0.03
) -> list[int]:
    """A letter's main latents: going up from k=1, each k whose k-sparse F1 beats the last accepted one by more than
    ``f1_jump_threshold`` is feature splitting; the latents of the last such k (k_sparse_probing.
    add_feature_splits_to_metrics_df; SAEBench counts len() of this list as num_split_features in its output)."""
    best, chosen = -100.0, []
    for k in sorted(f1_by_k):
        if not f1_by_k[k] > best + f1_jump_threshold:
            break
        best, chosen = f1_by_k[k], [int(i) for i in feature_ids_by_k[k]]
    return chosen


@dataclass(frozen=True)
class Absorption:
    """Per word: the absorption fraction (float64) and whether it is full absorption by a single latent."""

    fraction: torch.Tensor
    full: torch.Tensor


def absorption(
    acts: torch.Tensor,
    latents: torch.Tensor,
    probe_direction: torch.Tensor,
    w_dec: torch.Tensor,
    main_ids: Sequence[int],
    formula: Literal["0.4.1", "0.4.0"] = "0.4.1",
    fraction_cos_threshold: float = 0.1,
    full_cos_threshold: float = 0.025,
    proportion_threshold: float = 0.4,
    max_absorbing_latents: int = 3,
) -> Absorption:
    """Absorption for one letter's words (feature_absorption_calculator.FeatureAbsorptionCalculator.
    calculate_absorption): acts [n, d] the model's activations at each word's prompt token, latents [n, d_sae] their
    SAE encoding, ``probe_direction`` the letter's ground-truth probe row, ``main_ids`` its ``split_features``.
    SAEBench evaluates the test words of the letter that the ground-truth probe scores > 0, each in a fresh
    ``icl_prompt``.

    With u the unit probe direction: a = x . u (the probe projection), p_j = f_j cos(u, W_dec[j]) (each latent's), M =
    sum of p_j over the main latents.

    ``formula="0.4.1"`` (SAEBench 0.4.1 and later, the default): A = sum of the at most ``max_absorbing_latents`` (3)
    largest p_j among non-main latents with p_j > 0 and cos >= ``fraction_cos_threshold`` (0.1). Fraction 0 when M >=
    a or A / a < ``proportion_threshold`` (0.4); else 1 when M <= 0; else min(A, a - M) / (min(A, a - M) + M),
    clipped to [0, 1].

    ``formula="0.4.0"`` (SAEBench 0.4.0): with S = sum of p_j over all latents, fraction 0 when M >= a or S <= 0,
    else (S - M) / S clipped to [0, 1] (no alignment or size bar on the absorbing latents, every latent counted).

    Full absorption (same in both): no main latent fires (all < 1e-8), the top-projecting latent has cos >=
    ``full_cos_threshold`` (0.025), a >= 0, and that latent's p_j / a >= ``proportion_threshold``. Sums run in
    float32 and the ratios in float64, as SAEBench's Python floats.
    """
    direction = probe_direction / probe_direction.norm()
    cos = F.cosine_similarity(direction.to(w_dec.dtype), w_dec, dim=-1).float()
    proj = latents * cos.to(latents.dtype)
    act_proj = (acts @ direction.to(acts.dtype)).double()
    ids = torch.as_tensor(list(main_ids), dtype=torch.long)
    main = proj[:, ids].sum(dim=-1).double()
    if formula == "0.4.1":
        candidates = (cos >= fraction_cos_threshold)[None] & (proj > 0)
        candidates[:, ids] = False
        top = torch.where(candidates, proj, 0.0).topk(min(max_absorbing_latents, proj.shape[1]), dim=-1).values
        absorbed_total = top.sum(dim=-1).double()
        absorbed = torch.minimum(absorbed_total, act_proj - main)
        partial = (absorbed / (absorbed + main)).clip(0.0, 1.0)
        fraction = torch.where(main <= 0.0, 1.0, partial)
        fraction = torch.where((main >= act_proj) | (absorbed_total / act_proj < proportion_threshold), 0.0, fraction)
    else:
        total = proj.sum(dim=-1).double()
        fraction = torch.where((main >= act_proj) | (total <= 0), 0.0, ((total - main) / total).clip(0.0, 1.0))
    top_latent = proj.topk(min(10, proj.shape[1]), dim=-1).indices[:, 0]
    top_proj = latents[torch.arange(len(latents)), top_latent].double() * cos[top_latent].double()
    full = (
        (latents[:, ids] < _EPS).all(dim=-1)
        & (cos[top_latent] >= full_cos_threshold)
        & (act_proj >= 0)
        & (top_proj / act_proj >= proportion_threshold)
    )
    return Absorption(fraction, full)


def absorption_metrics(
    results: Mapping[int, Absorption],
    main_ids: Mapping[int, Sequence[int]],
    probe_f1: Mapping[int, float],
    min_probe_f1: float = 0.6,
    min_letters: int = 20,
) -> dict[str, float]:
    """The absorption eval's scores (absorption/main.py run_eval and _aggregate_results_df): per letter with words,
    mean_absorption_fraction = sum of fractions / number of words (its probe true positives) and full_absorption_rate
    likewise; then the mean and sample standard deviation over letters whose ground-truth probe F1 (``binary_f1`` on
    the test words) is > ``min_probe_f1``, and of their len(main_ids). Raises ValueError when fewer than
    ``min_letters`` letters of ``probe_f1`` pass that bar (SAEBench then reports no absorption).
    """
    if sum(f1 > min_probe_f1 for f1 in probe_f1.values()) < min_letters:
        raise ValueError(f"fewer than {min_letters} letters have a ground-truth probe F1 above {min_probe_f1}")
    kept = [letter for letter in sorted(results) if probe_f1[letter] > min_probe_f1]
    fractions = [results[letter].fraction.sum().item() / len(results[letter].fraction) for letter in kept]
    full = [results[letter].full.sum().item() / len(results[letter].full) for letter in kept]
    splits = [len(main_ids[letter]) for letter in kept]
    return {
        "mean_absorption_fraction_score": statistics.mean(fractions),
        "mean_full_absorption_score": statistics.mean(full),
        "mean_num_split_features": statistics.mean(splits),
        "std_dev_absorption_fraction_score": statistics.stdev(fractions),
        "std_dev_full_absorption_score": statistics.stdev(full),
        "std_dev_num_split_features": statistics.stdev(splits),
    }
