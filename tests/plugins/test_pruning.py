"""SAE pruning strategies: requested sparsity reached exactly, Wanda scores as the paper defines them, `latents`
keeps the kept latents' outputs and round-trips through the file format, inputs are never modified."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from saex.model.activations import TensorActivations
from saex.plugin.manager import load_plugins
from saex.plugins.pruning.latents import LatentsPruner
from saex.plugins.pruning.magnitude import MagnitudePruner
from saex.plugins.pruning.wanda import WandaPruner
from saex.plugins.sae.topk import TopKSAE
from saex.sae.base import SAE, load_sae, save_sae
from saex.sae.sparsity import sae_sparsity

D_IN, D_SAE, K = 16, 64, 4
PRUNERS = (MagnitudePruner(), WandaPruner(), LatentsPruner())


def topk_sae(seed: int = 0) -> TopKSAE:
    """A TopK SAE with random (non-tied) weights, non-zero biases and input normalisation."""
    sae = TopKSAE.build(D_IN, TopKSAE.Params(d_sae=D_SAE, k=K), seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        w_enc = torch.randn(D_IN, D_SAE, generator=g)
        sae.W_enc.copy_(w_enc / w_enc.norm(dim=0))  # unit columns: every latent wins the top-k now and then
        sae.W_dec.copy_(torch.randn(D_SAE, D_IN, generator=g))
        sae.b_enc.copy_(torch.randn(D_SAE, generator=g) * 0.1)
        sae.b_dec.copy_(torch.randn(D_IN, generator=g) * 0.2)
        sae.norm_scale.fill_(0.5)
    return sae


def calibration(n: int = 600, seed: int = 2) -> TensorActivations:
    g = torch.Generator().manual_seed(seed)
    return TensorActivations(torch.randn(n, D_IN, generator=g) * torch.linspace(0.2, 3.0, D_IN))


def zeros_per_column(weight: torch.Tensor) -> torch.Tensor:
    return (weight == 0).sum(0)


# --- requested sparsity --------------------------------------------------------------------------------


@pytest.mark.parametrize("pruner", [MagnitudePruner(), WandaPruner()], ids=lambda p: p.name)
@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.75])
def test_unstructured_pruners_reach_sparsity_exactly_in_every_output_column(pruner, sparsity):
    sae = topk_sae()
    pruned = pruner.prune(sae, pruner.Params(), calibration(), sparsity)
    assert (zeros_per_column(pruned.W_enc) == round(sparsity * D_IN)).all()  # per latent
    assert (zeros_per_column(pruned.W_dec) == round(sparsity * D_SAE)).all()  # per model dimension
    measured = sae_sparsity(pruned, reference=sae)
    assert measured["sparsity_W_enc"] == pytest.approx(round(sparsity * D_IN) / D_IN)
    assert measured["sparsity_W_dec"] == pytest.approx(round(sparsity * D_SAE) / D_SAE)
    assert measured["sparsity"] == pytest.approx(sparsity) and measured["latents_removed"] == 0.0
    for name in ("b_enc", "b_dec", "norm_scale"):
        assert torch.equal(getattr(pruned, name), getattr(sae, name)), f"{name} must stay as it is"


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.75])
def test_latents_shrinks_d_sae(sparsity):
    sae = topk_sae()
    pruned = LatentsPruner().prune(sae, LatentsPruner.Params(), calibration(), sparsity)
    kept = round((1 - sparsity) * D_SAE)
    assert pruned.d_sae == kept and pruned.params.d_sae == kept
    assert pruned.W_enc.shape == (D_IN, kept) and pruned.W_dec.shape == (kept, D_IN) and pruned.b_enc.shape == (kept,)
    assert pruned.steps_since_fired.shape == (kept,)
    measured = sae_sparsity(pruned, reference=sae)
    assert measured["latents_removed"] == pytest.approx(1 - kept / D_SAE)
    assert measured["sparsity"] == pytest.approx(1 - kept / D_SAE) and measured["d_sae"] == kept


def test_magnitude_prunes_the_smallest_weights_of_each_column():
    sae = topk_sae()
    pruned = MagnitudePruner().prune(sae, MagnitudePruner.Params(), calibration(), 0.5)
    for name in ("W_enc", "W_dec"):
        w = getattr(sae, name).detach().numpy()
        expected = np.zeros_like(w, dtype=bool)
        np.put_along_axis(expected, np.argsort(np.abs(w), axis=0)[: round(0.5 * w.shape[0])], True, axis=0)
        assert np.array_equal(getattr(pruned, name).detach().numpy() == 0, expected), name


def test_matrices_param_limits_pruning_to_the_encoder():
    sae = topk_sae()
    pruned = MagnitudePruner().prune(sae, MagnitudePruner.Params(matrices=["W_enc"]), calibration(), 0.5)
    assert torch.equal(pruned.W_dec, sae.W_dec) and sae_sparsity(pruned)["sparsity_W_enc"] == 0.5


# --- Wanda ---------------------------------------------------------------------------------------------


def wanda_reference(sae: TopKSAE, x: np.ndarray, sparsity: float) -> dict[str, np.ndarray]:
    """Masks (True = pruned) computed independently in numpy, float64: per output column, the smallest
    |W| * ||input||, where the encoder input is x * norm_scale - b_dec and the decoder input the latents."""
    scale = float(sae.norm_scale)
    enc_in = x * scale - sae.b_dec.detach().double().numpy()
    f = sae.encode(torch.from_numpy(x).float()).detach().double().numpy()
    masks = {}
    for name, norm in (("W_enc", np.linalg.norm(enc_in, axis=0)), ("W_dec", np.linalg.norm(f, axis=0))):
        w = getattr(sae, name).detach().double().numpy()
        score = np.abs(w) * norm[:, None]
        mask = np.zeros_like(w, dtype=bool)
        np.put_along_axis(mask, np.argsort(score, axis=0, kind="stable")[: round(sparsity * w.shape[0])], True, axis=0)
        masks[name] = mask
    return masks


@pytest.mark.parametrize("sparsity", [0.25, 0.5])
def test_wanda_mask_matches_numpy_reference(sparsity):
    sae, calib = topk_sae(), calibration()
    params = WandaPruner.Params(batch_size=128)  # several batches: the statistics are streamed
    pruned = WandaPruner().prune(sae, params, calib, sparsity)
    expected = wanda_reference(sae, calib.x.double().numpy(), sparsity)
    for name in ("W_enc", "W_dec"):
        assert np.array_equal(getattr(pruned, name).detach().numpy() == 0, expected[name]), name


def test_wanda_max_tokens_uses_only_the_first_tokens():
    sae, calib = topk_sae(), calibration()
    pruned = WandaPruner().prune(sae, WandaPruner.Params(batch_size=64, max_tokens=100), calib, 0.5)
    expected = wanda_reference(sae, calib.x[:100].double().numpy(), 0.5)
    assert np.array_equal(pruned.W_dec.detach().numpy() == 0, expected["W_dec"])


def test_wanda_prunes_decoder_rows_of_silent_latents_without_nan():
    """Latents that never fire on the calibration set get norm 0: when there are fewer of them than weights
    pruned per column, their decoder rows go entirely."""
    sae = topk_sae()
    with torch.no_grad():
        sae.b_enc[torch.arange(0, D_SAE, 4)] = -1e4
    silent = (sae.encode(calibration().x) == 0).all(0)
    assert 16 <= int(silent.sum()) <= round(0.5 * D_SAE)
    pruned = WandaPruner().prune(sae, WandaPruner.Params(), calibration(), 0.5)
    assert (pruned.W_dec[silent] == 0).all()
    x = calibration(seed=5).x
    f = pruned.encode(x)
    x_hat, _ = pruned(x)
    assert torch.isfinite(f).all() and torch.isfinite(pruned.decode(f)).all() and torch.isfinite(x_hat).all()
    assert all(math.isfinite(v) for v in sae_sparsity(pruned, sae).values())


# --- latents -------------------------------------------------------------------------------------------


def kept_indices(pruned: SAE, original: SAE) -> list[int]:
    """Original indices of the latents ``pruned`` kept, found by their encoder columns."""
    return [j for j in range(original.d_sae) if (pruned.W_enc == original.W_enc[:, j : j + 1]).all(0).any()]


def sae_with_silent_latents() -> tuple[TopKSAE, torch.Tensor]:
    """A TopK SAE whose odd latents never fire (very negative b_enc): dropping them cannot change the top-k
    selection, so the pruned SAE must reproduce the original exactly on the kept latents."""
    sae = topk_sae()
    silent = torch.arange(1, D_SAE, 2)
    with torch.no_grad():
        sae.b_enc[silent] = -1e4
    return sae, torch.arange(0, D_SAE, 2)


@pytest.mark.parametrize("score", ["frequency", "decoder_norm_x_activation"])
def test_latents_keeps_outputs_of_kept_latents(score):
    sae, live = sae_with_silent_latents()
    assert (sae.encode(calibration().x)[:, live] != 0).any(0).all(), "every live latent must fire"
    pruned = LatentsPruner().prune(sae, LatentsPruner.Params(score=score), calibration(), 0.5)
    assert pruned.d_sae == len(live)
    assert torch.equal(pruned.W_enc, sae.W_enc[:, live]) and torch.equal(pruned.W_dec, sae.W_dec[live])
    x = calibration(seed=7).x
    f_orig, f_pruned = sae.encode(x), pruned.encode(x)
    assert (f_orig[:, 1::2] == 0).all()
    torch.testing.assert_close(f_pruned, f_orig[:, live], rtol=0, atol=0)
    torch.testing.assert_close(pruned.decode(f_pruned), sae.decode(f_orig), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(pruned(x)[0], sae(x)[0], rtol=1e-6, atol=1e-5)


def test_latents_frequency_ranks_by_firing_share():
    sae = topk_sae()
    calib = calibration()
    fired = (sae.encode(calib.x) != 0).sum(0)
    pruned = LatentsPruner().prune(sae, LatentsPruner.Params(), calib, 0.75)
    kept = kept_indices(pruned, sae)
    dropped = sorted(set(range(D_SAE)) - set(kept))
    assert len(kept) == 16 and fired[kept].min() >= fired[dropped].max()


def test_latents_round_trips_through_save_and_load(tmp_path):
    sae = topk_sae()
    pruned = LatentsPruner().prune(sae, LatentsPruner.Params(), calibration(), 0.5)
    loaded = load_sae(save_sae(pruned, tmp_path / "pruned"), {"topk": TopKSAE})
    assert loaded.d_sae == pruned.d_sae == 32 and loaded.k == K
    state, loaded_state = pruned.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys() and all(torch.equal(state[k], loaded_state[k]) for k in state)


def test_latents_refuses_to_keep_fewer_than_k():
    sae = TopKSAE.build(D_IN, TopKSAE.Params(d_sae=D_SAE, k=20))
    with pytest.raises(ValueError, match="fewer than k=20"):
        LatentsPruner().prune(sae, LatentsPruner.Params(), calibration(), 0.75)


def test_latents_slices_per_latent_state_of_other_architectures():
    """Generic handling: a per-latent threshold (JumpReLU) is sliced; a scalar one (BatchTopK) is kept."""
    from saex.plugins.sae.batchtopk import BatchTopKSAE
    from saex.plugins.sae.jumprelu import JumpReLUSAE

    jump = JumpReLUSAE.build(D_IN, JumpReLUSAE.Params(d_sae=D_SAE))
    with torch.no_grad():
        jump.threshold.copy_(torch.rand(D_SAE, generator=torch.Generator().manual_seed(3)) * 0.1)
    pruned = LatentsPruner().prune(jump, LatentsPruner.Params(score="decoder_norm_x_activation"), calibration(), 0.5)
    kept = kept_indices(pruned, jump)
    assert pruned.threshold.shape == (32,) and torch.equal(pruned.threshold, jump.threshold[kept])

    batch = BatchTopKSAE.build(D_IN, BatchTopKSAE.Params(d_sae=D_SAE, k=K))
    with torch.no_grad():
        batch.threshold.fill_(0.25)
    pruned = LatentsPruner().prune(batch, LatentsPruner.Params(), calibration(), 0.5)
    assert pruned.d_sae == 32 and float(pruned.threshold) == 0.25


# --- contract ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pruner", PRUNERS, ids=lambda p: p.name)
def test_input_sae_is_not_modified(pruner):
    sae = topk_sae()
    sae.train()
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    pruned = pruner.prune(sae, pruner.Params(), calibration(), 0.5)
    assert pruned is not sae and sae.training
    after = sae.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("pruner", PRUNERS, ids=lambda p: p.name)
@pytest.mark.parametrize("sparsity", [1.0, -0.1, float("nan")])
def test_invalid_sparsity_is_a_value_error(pruner, sparsity):
    with pytest.raises(ValueError, match="0 <= sparsity < 1"):
        pruner.prune(topk_sae(), pruner.Params(), calibration(), sparsity)


@pytest.mark.parametrize("pruner", [WandaPruner(), LatentsPruner()], ids=lambda p: p.name)
def test_calibration_width_must_match(pruner):
    with pytest.raises(ValueError, match="width 8"):
        pruner.prune(topk_sae(), pruner.Params(), TensorActivations(torch.randn(10, 8)), 0.5)


def test_params_reject_unknown_keys():
    with pytest.raises(ValueError):
        LatentsPruner.Params(scor="frequency")
    with pytest.raises(ValueError):
        LatentsPruner.Params(score="random")


def test_pruners_are_registered_as_builtins():
    plugins = load_plugins(entry_points=False)
    assert plugins.names("pruner") == ["latents", "magnitude", "wanda"]
    assert [plugins.components["pruner"][n].plugin for n in plugins.names("pruner")] == [
        "pruning.latents",
        "pruning.magnitude",
        "pruning.wanda",
    ]
