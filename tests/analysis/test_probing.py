"""SAEBench's concept-level evals (saex.analysis.probing) on constructed activations with known answers."""

from __future__ import annotations

import math
import random

import pytest
import torch

from saex.analysis import probing
from saex.analysis.bootstrap import BootstrapParams

N_CLASSES = 3


def planted(n_per_class: int, d: int, seed: int, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled activations whose first N_CLASSES columns carry the class (``scale`` on the row's own class column,
    0 on the others) over nonnegative noise of 0.1 on the rest, and the labels."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(N_CLASSES).repeat_interleave(n_per_class)
    x = 0.1 * torch.rand(len(labels), d, generator=gen)
    x[:, :N_CLASSES] = scale * torch.nn.functional.one_hot(labels, N_CLASSES).float()
    return x, labels


def test_mean_pool_averages_the_real_tokens_only() -> None:
    acts = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]], [[5.0, 7.0], [-1.0, 0.0], [0.0, 1.0]]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert probing.mean_pool(acts, mask).tolist() == [[2.0, 3.0], [5.0, 7.0]]


def test_top_k_mean_diff_picks_the_planted_columns_largest_first() -> None:
    gen = torch.Generator().manual_seed(0)
    x = 0.01 * torch.randn(40, 10, generator=gen)
    y = torch.tensor([1, 0] * 20, dtype=torch.int32)
    x[y == 1, 7] += 5.0
    x[y == 0, 3] += 2.0  # a column more active on the negatives counts by |difference|
    assert probing.top_k_mean_diff(x, y, 2).tolist() == [7, 3]


def test_balanced_one_vs_rest_draws_equal_halves_deterministically() -> None:
    labels = torch.tensor([0] * 6 + [1] * 10 + [2] * 10)
    rows, targets = probing.balanced_one_vs_rest(labels, 0, seed=5)
    assert len(rows) == 12 and int(targets.sum()) == 6
    assert sorted(rows[targets == 1].tolist()) == [0, 1, 2, 3, 4, 5]
    assert all(labels[r] != 0 for r in rows[targets == 0])
    again, again_targets = probing.balanced_one_vs_rest(labels, 0, seed=5)
    assert torch.equal(rows, again) and torch.equal(targets, again_targets)
    # SCR's pairing: the negatives come from the paired class only
    rows, targets = probing.balanced_one_vs_rest(labels, 0, seed=5, paired=2)
    assert sorted(labels[rows[targets == 0]].tolist()) == [2] * 6
    with pytest.raises(ValueError, match="only 6 negatives"):
        probing.balanced_one_vs_rest(labels, 1, seed=5, paired=0)


def test_a_latent_equal_to_the_label_gives_top_1_accuracy_1() -> None:
    train_f, train_labels = planted(30, 12, seed=1)
    test_f, test_labels = planted(15, 12, seed=2)
    result = probing.sparse_probing(train_f, train_labels, test_f, test_labels, ks=(1, 2), seed=42)
    assert result["top_1_test_accuracy"] == 1.0
    assert result["per_class"]["top_1_test_accuracy"] == {0: 1.0, 1: 1.0, 2: 1.0}
    assert result["top_2_test_accuracy"] == 1.0
    assert result["test_accuracy"] == 1.0


def test_an_identity_sae_gives_exactly_the_model_numbers() -> None:
    gen = torch.Generator().manual_seed(3)
    labels = torch.arange(N_CLASSES).repeat_interleave(20)
    tokens = torch.randn(len(labels), 5, 8, generator=gen) + 0.7 * labels[:, None, None].float()
    mask = torch.rand(len(labels), 5, generator=gen) > 0.3
    mask[:, 0] = True
    pooled_x = probing.mean_pool(tokens, mask)
    pooled_f = probing.mean_pool(tokens @ torch.eye(8), mask)  # latents = activations, W_dec = I
    train, test = torch.arange(len(labels)) % 3 != 0, torch.arange(len(labels)) % 3 == 0
    llm = probing.sparse_probing(pooled_x[train], labels[train], pooled_x[test], labels[test], seed=7)
    sae = probing.sparse_probing(pooled_f[train], labels[train], pooled_f[test], labels[test], seed=7)
    assert sae == llm
    # ablating an identity SAE's latents zeroes exactly those columns of the pooled activations
    ablated = probing.ablate_pooled(pooled_x, pooled_f, torch.eye(8), torch.tensor([2, 5]))
    assert torch.equal(ablated[:, [2, 5]], torch.zeros(len(labels), 2))
    assert torch.equal(ablated[:, [0, 1, 3, 4, 6, 7]], pooled_x[:, [0, 1, 3, 4, 6, 7]])


def test_latent_effects_by_hand() -> None:
    latents = torch.tensor([[2.0, 0.0], [2.0, 1.0], [1.0, 1.0], [1.0, 2.0]])
    targets = torch.tensor([1, 1, 0, 0])
    w_dec = torch.tensor([[0.5, 0.0], [0.0, -2.0]])  # probe . W_dec[j] = 0.5, -2 for probe (1, 1)
    probe = torch.tensor([1.0, 1.0])
    # mean differences (1, -1): TPP clamps at 0 then weighs, SCR weighs then takes |.|
    assert probing.latent_effects(latents, targets, probe, w_dec).tolist() == [0.5, 0.0]
    assert probing.latent_effects(latents, targets, probe, w_dec, scr=True).tolist() == [0.5, 2.0]
    assert probing.top_n_latents(torch.tensor([0.5, 0.0, 3.0, -1.0]), 2).tolist() == [2, 0]
    assert probing.top_n_latents(torch.tensor([0.0, 0.0, 3.0, 0.0]), 2).tolist() == [2]


def test_ablating_the_planted_latent_moves_tpp_by_the_hand_computed_amount() -> None:
    # Identity SAE; class c's rows are 3 e_c; class c's probe is e_c with bias -1.5, so every clean accuracy is 1.
    x, labels = planted(8, N_CLASSES, seed=0)
    x = 3.0 * torch.nn.functional.one_hot(labels, N_CLASSES).float()
    w_dec = torch.eye(N_CLASSES)
    probes = {c: (torch.eye(N_CLASSES)[c], torch.tensor(-1.5)) for c in range(N_CLASSES)}
    gen = torch.Generator().manual_seed(0)

    def accuracies(pooled: torch.Tensor) -> dict[int, float]:
        out = {}
        for c, (weight, bias) in probes.items():
            rows, y = probing.balanced_one_vs_rest(labels, c, gen)
            out[c] = probing.probe_accuracy(pooled[rows], y, weight, bias)
        return out

    clean = accuracies(x)
    assert clean == {0: 1.0, 1: 1.0, 2: 1.0}
    ablated = {}
    for c, (weight, _) in probes.items():
        rows, y = probing.balanced_one_vs_rest(labels, c, gen)
        effects = probing.latent_effects(x[rows], y, weight, w_dec)
        assert effects.tolist() == [3.0 if j == c else 0.0 for j in range(N_CLASSES)]
        # only one nonzero effect, so n=2 ablates the same single latent as n=1
        ablated[c] = {
            n: accuracies(probing.ablate_pooled(x, x, w_dec, probing.top_n_latents(effects, n))) for n in (1, 2)
        }
    # the ablated class's rows become 0: its probe says "no" to all of them (accuracy 0.5); the others are untouched
    assert ablated[0][1] == {0: 0.5, 1: 1.0, 2: 1.0}
    means, per_class = probing.tpp_metrics(clean, ablated)
    assert per_class[1] == {
        "tpp_threshold_1_total_metric": 0.5,
        "tpp_threshold_1_intended_diff_only": 0.5,
        "tpp_threshold_1_unintended_diff_only": 0.0,
        "tpp_threshold_2_total_metric": 0.5,
        "tpp_threshold_2_intended_diff_only": 0.5,
        "tpp_threshold_2_unintended_diff_only": 0.0,
    }
    assert means["tpp_threshold_2_total_metric"] == 0.5


def test_tpp_metrics_average_the_unintended_drops() -> None:
    clean = {0: 0.9, 1: 0.8, 2: 1.0}
    ablated = {0: {5: {0: 0.6, 1: 0.7, 2: 0.9}}, 1: {5: {0: 0.9, 1: 0.8, 2: 1.0}}, 2: {5: {0: 0.5, 1: 0.8, 2: 0.5}}}
    means, per_class = probing.tpp_metrics(clean, ablated)
    assert per_class[0]["tpp_threshold_5_intended_diff_only"] == pytest.approx(0.3)
    assert per_class[0]["tpp_threshold_5_unintended_diff_only"] == pytest.approx(0.1)  # (0.1 + 0.1) / 2
    assert per_class[2]["tpp_threshold_5_total_metric"] == pytest.approx(0.5 - 0.2)  # (0.4 + 0.0) / 2
    assert means["tpp_threshold_5_total_metric"] == pytest.approx((0.2 + 0.0 + 0.3) / 3)


def test_the_tpp_pipeline_scores_0_when_nothing_is_ablated() -> None:
    # Noise-free classes (rows 3 e_c), so every probe that reaches test accuracy 1 scores 1 on any balanced sample:
    # with n=0 nothing is ablated and every difference is exactly 0.
    train_x = 3.0 * torch.eye(N_CLASSES).repeat_interleave(20, dim=0)
    test_x = 3.0 * torch.eye(N_CLASSES).repeat_interleave(10, dim=0)
    train_labels = torch.arange(N_CLASSES).repeat_interleave(20)
    test_labels = torch.arange(N_CLASSES).repeat_interleave(10)
    args = (train_x, train_x, train_labels, test_x, test_x, test_labels, torch.eye(N_CLASSES), (0, 1))
    means, per_class = probing.tpp(*args, seed=42)
    assert (means, per_class) == probing.tpp(*args, seed=42)
    assert {key: value for key, value in means.items() if "_0_" in key} == {
        "tpp_threshold_0_total_metric": 0.0,
        "tpp_threshold_0_intended_diff_only": 0.0,
        "tpp_threshold_0_unintended_diff_only": 0.0,
    }
    for metrics in per_class.values():
        assert metrics["tpp_threshold_1_total_metric"] == pytest.approx(
            metrics["tpp_threshold_1_intended_diff_only"] - metrics["tpp_threshold_1_unintended_diff_only"]
        )


def test_scr_normalises_by_the_gap_the_biased_probe_leaves() -> None:
    common = {"target_probe_accuracy": 0.95, "spurious_probe_accuracy": 0.9, "biased_on_spurious": 0.85}
    scores = probing.scr_metrics(
        **common,
        biased_on_target=0.6,
        ablated_biased_on_target={2: 0.8, 20: 0.95},
        ablated_biased_on_spurious={2: 0.85, 20: 0.875},
    )
    assert scores["scr_dir1_threshold_2"] == pytest.approx(0.2 / 0.35)
    assert scores["scr_dir1_threshold_20"] == pytest.approx(1.0)
    assert scores["scr_dir2_threshold_20"] == pytest.approx(0.025 / 0.05)
    # the biased probe was worse on the target data, so direction 1 is the metric
    assert scores["scr_metric_threshold_2"] == scores["scr_dir1_threshold_2"]
    tie = probing.scr_metrics(
        **common, biased_on_target=0.85, ablated_biased_on_target={2: 0.9}, ablated_biased_on_spurious={2: 0.9}
    )
    assert "scr_metric_threshold_2" not in tie  # SAEBench reports neither direction on a tie
    # a clean gap under 0.001 scores 0
    assert (
        probing.scr_metrics(
            **{**common, "biased_on_spurious": 0.8995},
            biased_on_target=0.9,
            ablated_biased_on_target={2: 1.0},
            ablated_biased_on_spurious={2: 1.0},
        )["scr_dir2_threshold_2"]
        == 0.0
    )


def test_absorption_fraction_by_hand_in_both_formulas() -> None:
    u = torch.tensor([1.0, 0.0, 0.0, 0.0])
    w_dec = torch.tensor(
        [
            [1.0, 0.0, 0.0, 0.0],  # 0: the main latent
            [0.6, 0.8, 0.0, 0.0],  # 1: an absorber, cos 0.6
            [0.05, 0.0, math.sqrt(1 - 0.05**2), 0.0],  # 2: cos 0.05, under the 0.1 bar of 0.4.1
            [0.0, 0.0, 0.0, 1.0],  # 3: orthogonal
        ]
    )
    latents = torch.tensor(
        [
            [2.0, 0.0, 0.0, 1.0],  # the main latent carries it all
            [0.0, 2.0, 0.0, 0.0],  # the absorber carries it all
            [0.5, 1.5, 0.0, 0.0],  # shared: 0.9 absorbed against 0.5 main
            [0.5, 0.0, 8.0, 0.0],  # the rest is on a barely aligned latent
        ]
    )
    acts = latents @ w_dec
    new = probing.absorption(acts, latents, u, w_dec, [0])
    assert new.fraction.tolist() == pytest.approx([0.0, 1.0, 0.9 / 1.4, 0.0], abs=1e-6)
    assert new.full.tolist() == [False, True, False, False]
    old = probing.absorption(acts, latents, u, w_dec, [0], formula="0.4.0")
    assert old.fraction.tolist() == pytest.approx([0.0, 1.0, 0.9 / 1.4, 0.4 / 0.9], abs=1e-6)


def test_k_sparse_probing_and_split_features() -> None:
    assert probing.split_features({1: 0.5, 2: 0.52, 3: 0.9}, {1: [4], 2: [4, 1], 3: [4, 1, 2]}) == [4]
    assert probing.split_features({1: 0.5, 2: 0.6, 3: 0.61}, {1: [4], 2: [4, 1], 3: [4, 1, 2]}) == [4, 1]
    assert probing.binary_f1(torch.tensor([1.0, -1.0, 2.0, -3.0]), torch.tensor([1, 1, 1, 0])) == pytest.approx(0.8)


def test_prompts_and_vocabulary() -> None:
    vocab = [w for w in [" apple", "Banana", "cat", " 12", "a-b", "", " dog", "  two"] if probing.is_alpha_word(w)]
    assert vocab == [" apple", "Banana", "cat", " dog"]
    assert [probing.first_letter_index(w) for w in vocab] == [0, 1, 2, 3]
    prompt = probing.icl_prompt("cat", vocab, random.Random(0), max_icl_examples=3)
    lines = prompt.split("\n")
    assert lines[0] == "" and lines[-1] == "cat has the first letter:"
    assert sorted(lines[1:-1]) == [
        " apple has the first letter: A",
        " dog has the first letter: D",
        "Banana has the first letter: B",
    ]


def test_letters_planted_in_one_latent_each_give_absorption_0() -> None:
    # 26 orthonormal letter directions in 32 dimensions; each word's activation is 2 x its letter's direction plus
    # noise off the letter directions; the SAE's latent j is letter j (encoder = decoder^T, ReLU).
    gen = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(32, 32, generator=gen))[0]
    w_dec = basis[:26]
    suffixes = ["an", "ot", "ime", "ulk", "erry", "ond", "ask", "ip", "ow", "ug"]
    words = [letter + suffix for letter in probing.LETTERS for suffix in suffixes]
    labels = torch.tensor([probing.first_letter_index(w) for w in words])
    acts = 2.0 * w_dec[labels] + 0.3 * torch.randn(len(words), 6, generator=gen) @ basis[26:]
    latents = torch.relu(acts @ w_dec.T)
    train, test = torch.arange(len(words)) % 5 != 0, torch.arange(len(words)) % 5 == 0

    # SAEBench's probes take batches of 64 (ground truth) and 4096 (L1) words from a vocabulary of tens of thousands;
    # on 208 words, batches of 8 and 16 give them enough steps
    probe_w, probe_b = probing.train_multi_probe(
        acts[train], labels[train], 26, seed=42, batch_size=8, num_epochs=50, weight_decay=1e-4
    )
    l1_w, _ = probing.train_multi_probe(
        latents[train], labels[train], 26, seed=42, batch_size=16, num_epochs=50, l1_decay=0.01
    )
    probes = probing.k_sparse_probes(latents[train], labels[train], l1_w, ks=(1, 2))
    scores = acts[test] @ probe_w.T + probe_b
    results, main_ids, probe_f1 = {}, {}, {}
    for letter in range(26):
        is_letter = labels[test] == letter
        probe_f1[letter] = probing.binary_f1(scores[:, letter], is_letter)
        f1 = {k: probing.binary_f1(probes[k][letter].score(latents[test]), is_letter) for k in (1, 2)}
        main_ids[letter] = probing.split_features(f1, {k: probes[k][letter].feature_ids.tolist() for k in (1, 2)})
        assert main_ids[letter] == [letter]
        words_rows = is_letter & (scores[:, letter] > 0)
        results[letter] = probing.absorption(
            acts[test][words_rows], latents[test][words_rows], probe_w[letter], w_dec, main_ids[letter]
        )
    metrics = probing.absorption_metrics(results, main_ids, probe_f1)
    assert metrics["mean_absorption_fraction_score"] == 0.0
    assert metrics["mean_full_absorption_score"] == 0.0
    assert metrics["mean_num_split_features"] == 1
    assert min(probe_f1.values()) == 1.0


def test_accuracy_intervals_resample_the_test_texts() -> None:
    params = BootstrapParams(resamples=300, seed=0)
    perfect = {"top_1_test_accuracy": {0: probing.Outcome(tuple(range(10)), (True,) * 10)}}
    assert probing.accuracy_intervals([perfect], [10], params) == {"top_1_test_accuracy": (1.0, 1.0)}

    def half(n: int) -> dict:
        return {"top_1_test_accuracy": {0: probing.Outcome(tuple(range(n)), tuple(i % 2 == 0 for i in range(n)))}}

    small = probing.accuracy_intervals([half(20)], [20], params)["top_1_test_accuracy"]
    large = probing.accuracy_intervals([half(400)], [400], params)["top_1_test_accuracy"]
    assert small[0] < 0.5 < small[1] and large[0] < 0.5 < large[1]
    assert large[1] - large[0] < (small[1] - small[0]) / 2  # the width falls as 1 / sqrt(texts)
    # two sets: the resampled means of both, so a perfect set narrows the interval of a noisy one
    both = probing.accuracy_intervals([half(20), perfect], [20, 10], params)["top_1_test_accuracy"]
    assert both == pytest.approx(((small[0] + 1) / 2, (small[1] + 1) / 2), abs=0.03)
