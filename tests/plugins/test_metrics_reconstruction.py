"""Reconstruction metrics pinned to hand-computed numbers (formulas: docs/METRICS.md)."""

from __future__ import annotations

import math

import pluggy
import pytest
import torch
from torch import nn

import saex.plugin.hookspecs
from saex.analysis.bootstrap import point
from saex.model.activations import TensorActivations
from saex.plugin.hookspecs import PROJECT
from saex.plugin.protocols import MetricContext
from saex.plugins.metrics import reconstruction
from saex.plugins.metrics.reconstruction import (
    BOOTSTRAPPED,
    METRIC_KEYS,
    TYPICAL_KEYS,
    Reconstruction,
    ReconstructionStats,
)

CPU = torch.device("cpu")


class LinearSAE(nn.Module):
    """A hand-built SAE stand-in: f = x @ W_enc, x_hat = f @ W_dec (no bias, no nonlinearity)."""

    def __init__(self, w_enc: torch.Tensor, w_dec: torch.Tensor):
        super().__init__()
        self.W_enc = nn.Parameter(w_enc.clone())
        self.W_dec = nn.Parameter(w_dec.clone())
        self.d_in, self.d_sae = w_enc.shape

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = x @ self.W_enc
        return f @ self.W_dec, f


def identity_sae(d: int) -> LinearSAE:
    return LinearSAE(torch.eye(d), torch.eye(d))


def zero_decoder_sae(d: int) -> LinearSAE:
    return LinearSAE(torch.eye(d), torch.zeros(d, d))


def stats_of(x: torch.Tensor, x_hat: torch.Tensor, f: torch.Tensor, batch_sizes: list[int] | None = None):
    stats = ReconstructionStats()
    start = 0
    for size in batch_sizes or [x.shape[0]]:
        stats.update(x[start : start + size], x_hat[start : start + size], f[start : start + size])
        start += size
    assert start == x.shape[0]
    return stats


def varied_data(n: int = 97, d: int = 8, d_sae: int = 16, seed: int = 0):
    """Dimensions with very different means and scales, an imperfect reconstruction, sparse latents."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.5, 5, d, dtype=torch.float64)
    x += torch.linspace(-50, 120, d, dtype=torch.float64)
    x_hat = x + 0.7 * torch.randn(n, d, generator=g, dtype=torch.float64)
    f = torch.relu(torch.randn(n, d_sae, generator=g, dtype=torch.float64) - 1.0)
    return x, x_hat, f


# --- hand-computed cases ---------------------------------------------------------------------------------


def test_perfect_reconstruction_scores_ev_one_mse_zero_cos_one_l2_ratio_one():
    x = torch.tensor([[1.0, 2.0], [3.0, 0.0], [2.0, 4.0]])
    result = stats_of(x, x.clone(), x.clone()).result()
    assert result["explained_variance"] == 1.0
    assert result["mse"] == 0.0
    assert result["cos"] == pytest.approx(1.0, abs=1e-12)
    assert result["l2_ratio"] == pytest.approx(1.0, abs=1e-12)


def test_zero_reconstruction_scores_mse_mean_squared_norm_cos_zero_l2_ratio_zero():
    # squared norms 1+4=5, 9+0=9, 4+16=20 -> mean 34/3; sum ||x - mu||^2 = 10 (see the 3x2 case) -> ev 1 - 34/10
    x = torch.tensor([[1.0, 2.0], [3.0, 0.0], [2.0, 4.0]])
    result = stats_of(x, torch.zeros_like(x), x.clone()).result()
    assert result["mse"] == pytest.approx(34 / 3, abs=1e-12)
    assert result["cos"] == 0.0
    assert result["l2_ratio"] == 0.0
    assert result["explained_variance"] == pytest.approx(1 - 34 / 10, abs=1e-12)


def test_predicting_the_per_dimension_mean_scores_ev_exactly_zero():
    x, _, f = varied_data()
    mu = x.mean(dim=0, keepdim=True).expand_as(x)
    result = stats_of(x, mu, f, [40, 40, 17]).result()
    assert result["explained_variance"] == pytest.approx(0.0, abs=1e-12)


def test_hand_computed_3x2_example():
    # x rows (1,2) (3,0) (2,4); mu = (2,2); sum ||x - mu||^2 = (1+0) + (1+4) + (0+4) = 10
    # x_hat rows (1,2) (3,1) (0,4); errors 0, (0,-1) -> 1, (2,0) -> 4; SSE = 5
    #   mse = 5/3; ev = 1 - 5/10 = 0.5
    # cos: row 1: 1; row 2: (3*3 + 0*1) / (3 * sqrt 10) = 3/sqrt 10; row 3: (0 + 16) / (sqrt 20 * 4) = 2/sqrt 5
    # l2_ratio: row 1: 1; row 2: sqrt 10 / 3; row 3: 4 / sqrt 20 = 2/sqrt 5
    # f rows (1,0,0,0) (0,-2,0,0) (3,0,0.5,0): l0 = (1+1+2)/3 = 4/3; l1 = (1 + 2 + 3.5)/3 = 6.5/3
    #   densities (2/3, 1/3, 1/3, 0): dead_frac = 1/4; dense (> 0.1) = 3/4
    x = torch.tensor([[1.0, 2.0], [3.0, 0.0], [2.0, 4.0]])
    x_hat = torch.tensor([[1.0, 2.0], [3.0, 1.0], [0.0, 4.0]])
    f = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, -2.0, 0.0, 0.0], [3.0, 0.0, 0.5, 0.0]])
    stats = stats_of(x, x_hat, f)
    result = stats.result()

    assert result["mse"] == pytest.approx(5 / 3, abs=1e-12)
    assert result["explained_variance"] == pytest.approx(0.5, abs=1e-12)
    assert result["cos"] == pytest.approx((1 + 3 / math.sqrt(10) + 2 / math.sqrt(5)) / 3, abs=1e-12)
    assert result["l2_ratio"] == pytest.approx((1 + math.sqrt(10) / 3 + 2 / math.sqrt(5)) / 3, abs=1e-12)
    assert result["l0"] == pytest.approx(4 / 3, abs=1e-12)
    assert result["l1"] == pytest.approx(6.5 / 3, abs=1e-12)
    assert stats.densities().dtype == torch.float64
    assert stats.densities().tolist() == pytest.approx([2 / 3, 1 / 3, 1 / 3, 0.0], abs=1e-15)
    assert result["dead_frac"] == 0.25
    assert result["dense_frac"] == 0.75
    assert set(result) == set(METRIC_KEYS)


def test_dense_means_strictly_more_than_a_tenth_of_tokens():
    # 20 tokens; latent 0 fires on 2 (density 0.1, not dense), latent 1 on 3 (0.15, dense), latent 2 never
    n = 20
    f = torch.zeros(n, 3)
    f[:2, 0] = 1.0
    f[:3, 1] = 1.0
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(1))
    result = stats_of(x, x.clone(), f).result()
    assert result["dense_frac"] == pytest.approx(1 / 3, abs=1e-15)
    assert result["dead_frac"] == pytest.approx(1 / 3, abs=1e-15)


def test_zero_norm_inputs_do_not_produce_nan():
    # row 1 is zero: cos is 0 (eps-guarded), its l2_ratio divides by 1 instead of 0 -> ||x_hat|| = 5
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    x_hat = torch.tensor([[3.0, 4.0], [3.0, 4.0]])
    result = stats_of(x, x_hat, x.clone()).result()
    assert result["cos"] == pytest.approx(0.5, abs=1e-12)
    assert result["l2_ratio"] == pytest.approx((5 + 1) / 2, abs=1e-12)
    assert all(math.isfinite(v) for v in result.values())


# --- pooling and the formulas we do not use --------------------------------------------------------------


def test_results_do_not_depend_on_how_tokens_are_split_into_batches():
    x, x_hat, f = varied_data()
    reference = stats_of(x, x_hat, f).result()
    for sizes in ([1] * 97, [7] * 13 + [6], [50, 3, 44], [96, 1]):
        result = stats_of(x, x_hat, f, sizes).result()
        for key in METRIC_KEYS:
            assert result[key] == pytest.approx(reference[key], rel=1e-12, abs=1e-12), (key, sizes)


def legacy_per_batch_ev(x: torch.Tensor, x_hat: torch.Tensor, batch_size: int) -> float:
    """SAELens's ``explained_variance_legacy``: per-token ratio against the batch's own mean, averaged."""
    values = []
    for start in range(0, x.shape[0], batch_size):
        xb, hb = x[start : start + batch_size], x_hat[start : start + batch_size]
        per_token = 1 - (xb - hb).pow(2).sum(-1) / (xb - xb.mean(0)).pow(2).sum(-1)
        values.append(per_token)
    return torch.cat(values).mean().item()


def test_legacy_per_batch_formula_changes_with_batch_size_and_ours_does_not():
    x, x_hat, f = varied_data()
    legacy = {b: legacy_per_batch_ev(x, x_hat, b) for b in (10, 97)}
    assert abs(legacy[10] - legacy[97]) > 1e-3
    ours = {b: stats_of(x, x_hat, f, [b] * (97 // b) + ([97 % b] if 97 % b else [])).result() for b in (10, 97)}
    assert ours[10]["explained_variance"] == pytest.approx(ours[97]["explained_variance"], abs=1e-12)


def scalar_mean_ev(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """SAEBench 0.6's formula: centres on one scalar (the mean of every entry), not per dimension."""
    return (1 - (x - x_hat).pow(2).sum() / (x - x.mean()).pow(2).sum()).item()


def test_ev_centres_each_dimension_unlike_saebench_scalar_mean():
    # x rows (1,10) (-1,10); x_hat = per-dimension mean (0,10) for both; SSE = 1 + 1 = 2
    # ours: sum ||x - mu||^2 = 2 -> ev = 0
    # scalar mean of all entries = 20/4 = 5; sum (x - 5)^2 = 16 + 25 + 36 + 25 = 102 -> 1 - 2/102
    x = torch.tensor([[1.0, 10.0], [-1.0, 10.0]])
    x_hat = torch.tensor([[0.0, 10.0], [0.0, 10.0]])
    ours = stats_of(x, x_hat, x.clone()).result()["explained_variance"]
    assert ours == pytest.approx(0.0, abs=1e-12)
    assert scalar_mean_ev(x.double(), x_hat.double()) == pytest.approx(1 - 2 / 102, abs=1e-12)


def test_ev_is_stable_when_means_dwarf_the_spread():
    # per-dimension means of 1e6 with unit spread: naive float64 S2 - S1^2/n would lose ~6 digits here
    x, x_hat, f = varied_data(seed=3)
    shifted = stats_of(x + 1e6, x_hat + 1e6, f, [10] * 9 + [7]).result()
    plain = stats_of(x, x_hat, f).result()
    assert shifted["explained_variance"] == pytest.approx(plain["explained_variance"], abs=1e-9)


def test_stats_reject_no_data_and_mismatched_shapes():
    with pytest.raises(ValueError, match="zero tokens"):
        ReconstructionStats().result()
    with pytest.raises(ValueError, match="x_hat"):
        ReconstructionStats().update(torch.zeros(3, 2), torch.zeros(3, 4), torch.zeros(3, 5))


# --- the plugin --------------------------------------------------------------------------------------------


def context(sae: nn.Module, x: torch.Tensor, batch_size: int = 2) -> MetricContext:
    return MetricContext(sae=sae, eval_activations=TensorActivations(x), device=CPU, batch_size=batch_size)


def test_plugin_scores_identity_sae_perfectly():
    x = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 1.0], [2.0, 4.0, -1.0], [0.5, -2.0, 3.0], [1.0, 1.0, 1.0]])
    plugin = Reconstruction()
    result = plugin.compute(context(identity_sae(3), x), plugin.Params())
    assert set(result) == {*METRIC_KEYS, *TYPICAL_KEYS}  # no eval blocks, no original: no intervals, no differences
    assert all(isinstance(v, float) for v in result.values())
    assert result["mse"] == 0.0
    assert result["explained_variance"] == 1.0
    assert result["cos"] == pytest.approx(1.0, abs=1e-6)
    # f = x: non-zeros per row 2, 2, 3, 3, 3 -> l0 = 13/5; |x| sums 3, 4, 7, 5.5, 3 -> l1 = 22.5/5
    assert result["l0"] == pytest.approx(13 / 5, abs=1e-12)
    assert result["l1"] == pytest.approx(22.5 / 5, abs=1e-6)
    assert result["dead_frac"] == 0.0
    assert result["dense_frac"] == 1.0


def test_plugin_matches_the_accumulator_and_ignores_batch_size():
    x, _, _ = varied_data(n=41, d=4)
    x = x.float()
    sae = LinearSAE(torch.randn(4, 6, generator=torch.Generator().manual_seed(5)), torch.randn(6, 4) * 0.1)
    plugin = Reconstruction()
    by_ctx = plugin.compute(context(sae, x, batch_size=41), plugin.Params())
    by_param = plugin.compute(context(sae, x, batch_size=41), plugin.Params(batch_size=4))
    with torch.no_grad():
        x_hat, f = sae(x)
    direct = stats_of(x, x_hat, f).result()
    for key in METRIC_KEYS:
        assert by_ctx[key] == pytest.approx(direct[key], rel=1e-9, abs=1e-9), key
        assert by_param[key] == pytest.approx(direct[key], rel=1e-6, abs=1e-6), key


def test_plugin_zero_decoder_scores_mse_as_mean_squared_norm():
    x = torch.tensor([[1.0, 2.0], [3.0, 0.0], [2.0, 4.0]])
    plugin = Reconstruction()
    result = plugin.compute(context(zero_decoder_sae(2), x), plugin.Params())
    assert result["mse"] == pytest.approx(34 / 3, abs=1e-6)
    assert result["cos"] == 0.0
    assert result["l2_ratio"] == 0.0


def test_plugin_rejects_empty_source_and_width_mismatch():
    plugin = Reconstruction()
    with pytest.raises(ValueError, match="zero tokens"):
        plugin.compute(context(identity_sae(3), torch.zeros(0, 3)), plugin.Params())
    with pytest.raises(ValueError, match="d_in=3.*width 2"):
        plugin.compute(context(identity_sae(3), torch.zeros(4, 2)), plugin.Params())


def test_plugin_params_forbid_unknown_keys():
    with pytest.raises(ValueError):
        Reconstruction.Params(batchsize=3)
    with pytest.raises(ValueError):
        Reconstruction.Params(batch_size=0)


def test_module_registers_the_metric_through_pluggy():
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(saex.plugin.hookspecs)
    pm.register(reconstruction)
    registered = []
    pm.hook.register_metrics(register=registered.append)
    assert [m.name for m in registered] == ["reconstruction"]
    assert registered[0].description


# --- typical tokens (norm below massive_norm_multiple x the median) --------------------------------------------


def planted_massive_tokens() -> torch.Tensor:
    """8 typical tokens of norm 1 around the mean (0, 0), then 2 planted massive ones of norm 100."""
    typical = [[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]] * 2
    return torch.tensor([*typical, [100.0, 0.0], [0.0, 100.0]])


def test_typical_tokens_leave_out_planted_massive_ones():
    # x_hat = x @ [[0.5, 0.5], [0, 1]]: (±1, 0) -> ±(0.5, 0.5), error 0.5 each; (0, ±1) exact
    #   (100, 0) -> (50, 50), error 5000; (0, 100) exact
    # norms: eight 1s, two 100s -> median 1, threshold 10 x 1 = 10: massive share 2/10
    # typical: SSE = 4 x 0.5 = 2, sum ||x - (0, 0)||^2 = 8 -> ev 0.75, mse 2/8; cos (4/sqrt 2 + 4)/8
    # massive: mean (50, 50), sum ||x - mu||^2 = 2 x 5000 -> ev 1 - 5000/10000 = 0.5
    # all: mean (10, 10), sum ||x - mu||^2 = 20008 - 10 x 200 = 18008, SSE 5002 -> ev 1 - 5002/18008
    sae = LinearSAE(torch.eye(2), torch.tensor([[0.5, 0.5], [0.0, 1.0]]))
    plugin = Reconstruction()
    result = plugin.compute(context(sae, planted_massive_tokens(), batch_size=3), plugin.Params())
    assert result["massive_norm_threshold"] == pytest.approx(10.0, abs=1e-12)
    assert result["massive_share"] == pytest.approx(0.2, abs=1e-15)
    assert result["explained_variance_typical"] == pytest.approx(0.75, abs=1e-12)
    assert result["mse_typical"] == pytest.approx(0.25, abs=1e-12)
    assert result["cos_typical"] == pytest.approx((1 + 1 / math.sqrt(2)) / 2, abs=1e-7)
    assert result["explained_variance_massive"] == pytest.approx(0.5, abs=1e-12)
    assert result["explained_variance"] == pytest.approx(1 - 5002 / 18008, abs=1e-12)


def test_without_massive_tokens_typical_equals_all_and_massive_ev_is_nan():
    sae = LinearSAE(torch.eye(2), torch.tensor([[0.5, 0.5], [0.0, 1.0]]))
    plugin = Reconstruction()
    result = plugin.compute(context(sae, planted_massive_tokens()), plugin.Params(massive_norm_multiple=200))
    assert result["massive_share"] == 0.0 and math.isnan(result["explained_variance_massive"])
    for key in ("explained_variance", "mse", "cos"):
        assert result[f"{key}_typical"] == result[key]


# --- bootstrap intervals over eval blocks and paired differences --------------------------------------------


def blocked_context(sae: nn.Module, batch_size: int, reference: nn.Module | None = None) -> MetricContext:
    """97 rows of 8-dimensional activations from 13 eval blocks of unequal length, with an original SAE."""
    x, _, _ = varied_data(n=97, d=8, seed=4)
    blocks = torch.repeat_interleave(torch.arange(13), torch.tensor([7, 8, 6, 9, 7, 8, 7, 7, 8, 6, 9, 8, 7]))
    return MetricContext(
        sae=sae,
        eval_activations=TensorActivations(x.float()),
        device=CPU,
        batch_size=batch_size,
        reference_sae=reference,
        eval_blocks=blocks,
    )


def noisy_sae(seed: int) -> LinearSAE:
    g = torch.Generator().manual_seed(seed)
    return LinearSAE(torch.eye(8) + 0.1 * torch.randn(8, 8, generator=g), torch.eye(8))


def test_values_and_intervals_do_not_depend_on_the_batch_size():
    plugin, sae, original = Reconstruction(), noisy_sae(0), noisy_sae(1)
    params = plugin.Params(resamples=200)
    small = plugin.compute(blocked_context(sae, 5, original), params)
    large = plugin.compute(blocked_context(sae, 64, original), params)
    assert set(small) == set(large) == {output.name for output in plugin.outputs}
    for key, value in large.items():
        assert small[key] == pytest.approx(value, rel=1e-6, abs=1e-9, nan_ok=True), key


def test_intervals_are_exactly_reproducible_for_a_seed():
    plugin, sae = Reconstruction(), noisy_sae(0)
    first = plugin.compute(blocked_context(sae, 16), plugin.Params(resamples=200, seed=7))
    again = plugin.compute(blocked_context(sae, 16), plugin.Params(resamples=200, seed=7))
    other = plugin.compute(blocked_context(sae, 16), plugin.Params(resamples=200, seed=8))
    assert first == again
    assert first["explained_variance_ci_low"] != other["explained_variance_ci_low"]
    for key in BOOTSTRAPPED:
        assert first[f"{key}_ci_low"] <= first[key] <= first[f"{key}_ci_high"], key


def test_an_sae_against_itself_differs_by_exactly_zero_with_a_zero_width_interval():
    plugin, sae = Reconstruction(), noisy_sae(0)
    result = plugin.compute(blocked_context(sae, 16, reference=sae), plugin.Params())
    for key in BOOTSTRAPPED:
        assert result[f"{key}_vs_original"] == 0.0
        assert result[f"{key}_vs_original_ci_low"] == result[f"{key}_vs_original_ci_high"] == 0.0


def test_a_paired_difference_is_the_difference_of_the_two_scores():
    plugin, sae, original = Reconstruction(), noisy_sae(0), noisy_sae(1)
    paired = plugin.compute(blocked_context(sae, 16, original), plugin.Params())
    alone = plugin.compute(blocked_context(original, 16), plugin.Params())
    for key in BOOTSTRAPPED:
        assert paired[f"{key}_vs_original"] == pytest.approx(paired[key] - alone[key], abs=1e-12), key
        assert paired[f"{key}_vs_original_ci_low"] <= paired[f"{key}_vs_original_ci_high"]


def test_bootstrap_ev_at_unit_weights_is_the_pooled_ev_even_when_means_dwarf_the_spread():
    x, x_hat, f = varied_data(seed=3)
    blocks = torch.arange(97) // 10
    for shift in (0.0, 1e6):
        stats = ReconstructionStats(n_blocks=10)
        for start in range(0, 97, 30):
            rows = slice(start, start + 30)
            stats.update(x[rows] + shift, x_hat[rows] + shift, f[rows], blocks[rows])
        statistics, result = stats.statistics(), stats.result()
        for key in BOOTSTRAPPED:
            assert point(statistics[key], 10) == pytest.approx(result[key], rel=1e-9, abs=1e-9), (key, shift)


def test_plugin_rejects_a_block_map_of_the_wrong_length():
    ctx = blocked_context(noisy_sae(0), 16)
    ctx.eval_blocks = ctx.eval_blocks[:-1]
    with pytest.raises(ValueError, match="eval_blocks must name the block of each of the 97 eval rows"):
        Reconstruction().compute(ctx, Reconstruction.Params())
