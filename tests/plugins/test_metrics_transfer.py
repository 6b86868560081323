"""Transfer metrics on constructed cases with known answers: an SAE compared with itself is perfect, a permuted copy
is matched back exactly, latents silenced, moved or created on "M_c" land in their survival class, and the
streaming top-k equals the top-k over all tokens."""

import numpy as np
import pytest
import torch

from saex.analysis.alignment import best_cosines, cosines, hungarian
from saex.analysis.survival import LatentPairs, RunningTopK, Survival, SurvivalParams, classify, frequency_profile
from saex.model.activations import TensorActivations
from saex.plugin.protocols import MetricContext
from saex.plugins.metrics.transfer import Transfer
from saex.plugins.sae.relu import ReLUSAE
from saex.plugins.sae.topk import TopKSAE


@pytest.fixture
def sae():
    return TopKSAE.build(8, TopKSAE.Params(d_sae=32, k=4, normalize_input=False), seed=0).eval()


def context(sae, x, x_ref=None, ref_sae=None) -> MetricContext:
    return MetricContext(
        sae,
        TensorActivations(x),
        torch.device("cpu"),
        batch_size=7,
        reference_activations=TensorActivations(x_ref) if x_ref is not None else None,
        reference_sae=ref_sae,
    )


def compute(sae, x, x_ref=None, ref_sae=None):
    return Transfer().compute(context(sae, x, x_ref, ref_sae), Transfer.Params())


def test_sae_compared_with_itself_is_perfect(sae):
    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(1))
    ctx = context(sae, x, x, sae)
    found = Transfer().compute(ctx, Transfer.Params())
    never = float((ctx.per_latent["density_m"] == 0).double().mean())
    assert found["freq_shift_mean_abs"] == 0
    assert found["freq_corr"] == pytest.approx(1)
    assert found["act_corr_mean"] == pytest.approx(1, abs=1e-9)
    assert found["survival_intact"] == 1 and found["survival_intact_weighted"] == 1
    assert found["survival_shifted"] == 0 and found["survival_dead"] == 0 and found["latents_new_on_mc"] == 0
    assert found["latents_never"] == never and found["top_overlap_mean"] == 1
    assert found["dec_match_mean_max_cos"] == pytest.approx(1, abs=1e-6)
    assert found["dec_match_share_above_0.7"] == 1
    for part in ("dec", "enc"):
        assert found[f"align_{part}_mean_cos"] == pytest.approx(1, abs=1e-6)
        assert found[f"align_{part}_share_above_0.9"] == 1
        assert torch.equal(ctx.per_latent[f"align_{part}_partner"], torch.arange(32))
    classes = ctx.per_latent["survival_class"]
    assert set(classes.tolist()) <= {Survival.INTACT, Survival.NEVER}
    profile = ctx.details["survival_by_frequency"]["bins"]
    assert sum(b["latents"] for b in profile) == int((classes == Survival.INTACT).sum())
    assert all(b["intact"] == 1 for b in profile)


def test_no_reference_gives_no_transfer_metrics(sae):
    assert compute(sae, torch.randn(10, 8)) == {}


def test_frequency_shift_is_measured(sae):
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(2))
    noisy = x + 3 * torch.randn(300, 8, generator=torch.Generator().manual_seed(3))
    found = compute(sae, noisy, x)
    with torch.no_grad():
        da, db = (sae.encode(x) != 0).double().mean(0), (sae.encode(noisy) != 0).double().mean(0)
    assert found["freq_shift_mean_abs"] == pytest.approx(float((da - db).abs().mean()), abs=1e-12)
    assert found["act_corr_mean"] < 0.9 and found["survival_intact"] < 0.5


def identity_relu(d: int) -> ReLUSAE:
    """f = ReLU(x), x_hat = f: latent j reads input dimension j and nothing else."""
    sae = ReLUSAE.build(d, ReLUSAE.Params(d_sae=d, normalize_input=False), seed=0).eval()
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(d))
        sae.W_dec.copy_(torch.eye(d))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_survival_classes_of_a_constructed_case_are_exact():
    """Latents 0-1 unchanged, 2-3 on shuffled tokens (shifted), 4-5 silenced on M_c (dead), 6 firing on M_c only
    (new), 7 on neither (never)."""
    g = torch.Generator().manual_seed(0)
    on_m = torch.rand(500, 8, generator=g) + 0.1
    on_m[:, 6:] = -on_m[:, 6:]
    on_mc = on_m.clone()
    on_mc[:, 2:4] = on_m[torch.randperm(500, generator=g), 2:4]
    on_mc[:, 4:6] = 0
    on_mc[:, 6] = -on_m[:, 6]
    ctx = context(identity_relu(8), on_mc, on_m)
    found = Transfer().compute(ctx, Transfer.Params())
    codes = [Survival.INTACT] * 2 + [Survival.SHIFTED] * 2 + [Survival.DEAD] * 2 + [Survival.NEW, Survival.NEVER]
    assert ctx.per_latent["survival_class"].tolist() == codes
    assert found["survival_intact"] == pytest.approx(2 / 6) and found["survival_shifted"] == pytest.approx(2 / 6)
    assert found["survival_dead"] == pytest.approx(2 / 6) and found["survival_intact_weighted"] == pytest.approx(2 / 6)
    assert found["latents_new_on_mc"] == 1 / 8 and found["latents_never"] == 1 / 8
    ratio = ctx.per_latent["freq_ratio"]
    assert ratio[:4].tolist() == [1, 1, 1, 1] and ratio[4:6].tolist() == [0, 0] and ratio[6] == float("inf")
    assert ctx.per_latent["top_overlap"][:2].tolist() == [1, 1] and ctx.per_latent["top_overlap"][2:4].max() < 0.5


def test_half_the_latents_zeroed_are_dead_and_the_rest_intact():
    g = torch.Generator().manual_seed(4)
    f = torch.rand(400, 64, generator=g) * (torch.rand(400, 64, generator=g) < 0.2)
    zeroed = f.clone()
    zeroed[:, ::2] = 0
    pairs = LatentPairs(64, top_k=16)
    for i in range(0, 400, 37):
        pairs.add(f[i : i + 37], zeroed[i : i + 37])
    classes = classify(pairs.per_latent(), SurvivalParams())
    assert classes[::2].tolist() == [Survival.DEAD] * 32 and classes[1::2].tolist() == [Survival.INTACT] * 32


def test_streamed_pair_statistics_equal_the_direct_ones_over_all_tokens():
    """Correlation, densities and frequency ratio from the sparse streaming sums, against numpy over every token."""
    g = torch.Generator().manual_seed(6)
    a = torch.rand(300, 12, generator=g) * (torch.rand(300, 12, generator=g) < 0.3)
    b = (a + 0.3 * torch.rand(300, 12, generator=g)) * (torch.rand(300, 12, generator=g) < 0.6)
    pairs = LatentPairs(12, top_k=4)
    for i in range(0, 300, 41):
        pairs.add(a[i : i + 41], b[i : i + 41])
    found = pairs.per_latent()
    a64, b64 = a.double().numpy(), b.double().numpy()
    corr = [np.corrcoef(a64[:, j], b64[:, j])[0, 1] for j in range(12)]
    np.testing.assert_allclose(found["act_corr"].numpy(), corr, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(found["density_m"].numpy(), (a64 != 0).mean(0))
    np.testing.assert_array_equal(found["freq_ratio"].numpy(), (b64 != 0).mean(0) / (a64 != 0).mean(0))


def test_running_top_k_equals_the_top_k_over_all_tokens():
    g = torch.Generator().manual_seed(5)
    f = torch.rand(300, 10, generator=g) * (torch.rand(300, 10, generator=g) < 0.5)
    running = RunningTopK(10, 8)
    for i in range(0, 300, 23):
        running.add(f[i : i + 23], i)
    top = f.topk(8, dim=0)
    assert torch.equal(running.values, top.values)
    assert torch.equal(running.positions.sort(0).values, top.indices.sort(0).values)


def test_frequency_profile_bins_latents_by_decade_of_density():
    density = torch.tensor([0.0, 0.002, 0.005, 0.03, 0.5, 1.0])
    classes = torch.tensor([Survival.NEVER, Survival.INTACT, Survival.DEAD, Survival.SHIFTED, 0, 0], dtype=torch.int8)
    bins = frequency_profile(density, classes)["bins"]
    assert [(b["low"], b["latents"]) for b in bins] == [(0.001, 2), (0.01, 1), (0.1, 2)]
    assert bins[0]["intact"] == 0.5 and bins[0]["dead"] == 0.5 and bins[1]["shifted"] == 1 and bins[2]["intact"] == 1


def test_hungarian_recovers_a_permutation_exactly(sae):
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(6))
    permuted = TopKSAE.build(8, sae.params, seed=0).eval()
    with torch.no_grad():
        permuted.W_dec.copy_(sae.W_dec[perm])
        permuted.W_enc.copy_(sae.W_enc[:, perm])
        permuted.b_enc.copy_(sae.b_enc[perm])
    ctx = context(permuted, torch.randn(20, 8), ref_sae=sae)
    found = Transfer().compute(ctx, Transfer.Params())
    for part in ("dec", "enc"):
        assert torch.equal(ctx.per_latent[f"align_{part}_partner"], perm)
        assert found[f"align_{part}_mean_cos"] == pytest.approx(1, abs=1e-6)


def test_hungarian_matches_one_to_one_where_best_cosine_does_not():
    """Two rows near the same reference row: the best cosine gives both ~1, the matching only one."""
    reference = torch.eye(3)
    rows = torch.tensor([[1.0, 0.1, 0], [1.0, -0.1, 0], [0, 0, 1.0]])
    assert best_cosines(rows, reference).min() > 0.99
    matching = hungarian(rows, reference)
    # row 1 takes reference 0 (cosine 0.995); row 0 is left reference 1 (0.0995), not -0.0995 the other way
    assert matching.partner.tolist() == [1, 0, 2]
    assert matching.cosine.tolist() == pytest.approx([0.1 / 1.01**0.5, 1 / 1.01**0.5, 1])


@pytest.mark.parametrize("noise", [0.05, 3.0])  # each row's best partner distinct (no solver needed), or not
def test_hungarian_sums_what_scipy_does_with_or_without_the_row_maximum_shortcut(noise):
    from scipy.optimize import linear_sum_assignment

    g = torch.Generator().manual_seed(1)
    b = torch.randn(300, 16, generator=g)
    perm = torch.randperm(300, generator=g)
    a = b[perm] + noise * torch.randn(300, 16, generator=g)
    similarity = cosines(a, b)
    rows, cols = linear_sum_assignment(similarity.numpy(), maximize=True)
    matching = hungarian(a, b)
    assert len(matching.partner.unique()) == 300
    assert matching.cosine.sum().item() == pytest.approx(similarity.numpy()[rows, cols].sum(), abs=1e-4)
    assert torch.equal(matching.cosine, similarity[torch.arange(300), matching.partner])
    if noise < 1:
        assert torch.equal(matching.partner, perm)
    else:
        assert len(similarity.argmax(dim=1).unique()) < 300  # the solver's case


def test_alignment_of_a_narrower_or_wider_sae_leaves_extra_latents_unmatched():
    wide = torch.eye(4)
    matching = hungarian(wide, wide[:2])
    assert matching.partner.tolist() == [0, 1, -1, -1] and matching.cosine.tolist() == [1, 1, 0, 0]
    assert hungarian(wide[:2], wide).partner.tolist() == [0, 1]


def test_zero_rows_have_cosine_zero_never_nan():
    w = torch.eye(4)
    pruned = w.clone()
    pruned[1] = 0
    assert torch.equal(best_cosines(pruned, w), torch.tensor([1.0, 0.0, 1.0, 1.0]))
    assert hungarian(pruned, w).cosine.tolist() == [1, 0, 1, 1]
    assert best_cosines(torch.tensor([[1.0, 1.0, 0, 0]]), w).item() == pytest.approx(2**-0.5)


def test_no_alignment_above_the_width_limit(sae):
    found = Transfer().compute(context(sae, torch.randn(5, 8), ref_sae=sae), Transfer.Params(align_max_latents=16))
    assert "dec_match_mean_max_cos" in found and not any(k.startswith("align_") for k in found)
