"""Every built-in SAE architecture on tiny planted-feature data: training recovers the planted dictionary, the
file format round-trips bit-exactly, NaN stops training; then what is specific to ReLU, BatchTopK, JumpReLU
(TopK's own tests are in test_sae_topk.py)."""

from __future__ import annotations

import pytest
import torch
from test_sae_topk import ACTIVE, D_IN, planted
from test_training import NaNAtBatch

from saex.model.activations import TensorActivations
from saex.plugin.manager import load_plugins
from saex.plugin.protocols import SAEArchitecture
from saex.plugins.sae.batchtopk import BatchTopKSAE
from saex.plugins.sae.jumprelu import JumpReLUSAE
from saex.plugins.sae.relu import ReLUSAE
from saex.plugins.sae.topk import TopKSAE
from saex.sae.base import SAE, load_sae, save_sae
from saex.sae.training import TrainingConfig, TrainingDiverged, train_sae

CPU = torch.device("cpu")
ARCHITECTURES: dict[str, SAEArchitecture] = {
    "relu": ReLUSAE,
    "topk": TopKSAE,
    "batchtopk": BatchTopKSAE,
    "jumprelu": JumpReLUSAE,
}
# per architecture: params that recover the planted dictionary in 60k tokens
PARAMS: dict[str, dict[str, object]] = {
    "relu": {"l1_coefficient": 2.0},
    "topk": {"k": ACTIVE, "dead_steps_threshold": 20},
    "batchtopk": {"k": ACTIVE, "dead_steps_threshold": 20},
    "jumprelu": {"sparsity_coefficient": 0.3},
}
TRAINING = TrainingConfig(tokens=60_000, batch_size=256, lr=3e-3)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(name: str, **params: object) -> SAE:
    arch = ARCHITECTURES[name]
    return arch.build(D_IN, arch.Params(**({"d_sae": 128} | PARAMS[name] | params)), seed=0)


@pytest.fixture(scope="module")
def trained() -> dict[str, tuple[SAE, dict[str, float]]]:
    _, x = planted()
    out = {}
    for name in ARCHITECTURES:
        sae = build(name)
        out[name] = (sae, train_sae(sae, TensorActivations(x), TRAINING, device=CPU, progress=False).final)
    return out


def mean_max_cosine(dictionary: torch.Tensor, W_dec: torch.Tensor) -> float:
    directions = torch.nn.functional.normalize(W_dec.detach(), dim=-1)
    return (dictionary @ directions.T).max(-1).values.mean().item()


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_training_recovers_planted_dictionary(name, trained):
    dictionary, _ = planted()
    sae, final = trained[name]
    assert mean_max_cosine(dictionary, sae.W_dec) > 0.9
    assert final["explained_variance"] > 0.8


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_save_load_round_trip_is_bit_exact(name, trained, tmp_path):
    sae, _ = trained[name]
    save_sae(sae, tmp_path)
    loaded = load_sae(tmp_path, ARCHITECTURES)
    assert type(loaded) is type(sae) and loaded.params == sae.params
    state = loaded.state_dict()
    assert state.keys() == sae.state_dict().keys()
    for key, tensor in sae.state_dict().items():
        assert torch.equal(tensor, state[key]), key
    _, x = planted(n=128, seed=4)
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), sae.encode(x))
        assert torch.equal(loaded(x)[0], sae(x)[0])


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_bf16_autocast_stays_within_one_percent_of_fp32(name, trained):
    _, x = planted()
    sae = build(name)
    bf16 = TRAINING.model_copy(update={"precision": "bfloat16"})
    final = train_sae(sae, TensorActivations(x), bf16, device=CPU, progress=False).final
    reference = trained[name][1]
    assert final["explained_variance"] == pytest.approx(reference["explained_variance"], rel=0.01)
    assert final["l0"] == pytest.approx(reference["l0"], rel=0.01)


@pytest.mark.parametrize("name", ["relu", "jumprelu", "batchtopk"])
def test_nan_in_activations_stops_training_with_the_step(name):
    _, x = planted(n=2000)
    sae = build(name, normalize_input=False, b_dec_init="zero")
    with pytest.raises(TrainingDiverged, match="at step 2 .*lower lr"):
        train_sae(sae, NaNAtBatch(x, bad=2), TrainingConfig(tokens=2000, batch_size=100), device=CPU, progress=False)


def test_every_architecture_is_a_default_plugin():
    assert load_plugins(entry_points=False).names("sae") == ["batchtopk", "jumprelu", "relu", "topk"]


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_params_reject_unknown_keys(name):
    with pytest.raises(ValueError, match="bogus"):
        ARCHITECTURES[name].Params(bogus=1)


# --- ReLU ---------------------------------------------------------------------------------------------------


def test_relu_l1_is_weighted_by_decoder_norm():
    _, x = planted(n=64)
    sae = build("relu", normalize_input=False, b_dec_init="zero", l1_coefficient=1.0)
    with torch.no_grad():
        before = sae.training_loss(x).parts["l1"]
        sae.W_dec.mul_(3)
        sae.W_enc.div_(3)  # same latents / 3, decoder x3: the weighted L1 is unchanged
        after = sae.training_loss(x).parts["l1"]
    assert after == pytest.approx(before, rel=1e-5)


def test_relu_l1_warmup_ramps_linearly_over_tokens():
    _, x = planted(n=100)
    sae = build("relu", l1_coefficient=2.0, l1_warmup_tokens=400)
    weights = [sae.training_loss(x).parts["l1_weight"] for _ in range(5)]
    assert weights == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.0])


def test_relu_latents_are_relu_of_preactivations(trained):
    sae, _ = trained["relu"]
    assert isinstance(sae, ReLUSAE)
    _, x = planted(n=64, seed=5)
    with torch.no_grad():
        f = sae.encode(x)
        pre = (x * sae.norm_scale - sae.b_dec) @ sae.W_enc + sae.b_enc
    torch.testing.assert_close(f, pre.relu())


# --- BatchTopK ----------------------------------------------------------------------------------------------


def test_batchtopk_training_keeps_k_per_token_on_average(trained):
    sae, final = trained["batchtopk"]
    assert final["l0"] == pytest.approx(ACTIVE)  # exactly k * batch kept per training batch
    _, x = planted(n=512)
    with torch.no_grad():
        f = sae.batch_topk((x * sae.norm_scale - sae.b_dec) @ sae.W_enc + sae.b_enc)
    counts = (f != 0).sum(-1)
    assert counts.double().mean() == pytest.approx(ACTIVE)
    assert counts.min() < counts.max()  # per token it varies: that is the point of BatchTopK


def test_batchtopk_fitted_threshold_gives_mean_l0_near_k(trained):
    sae, _ = trained["batchtopk"]
    assert isinstance(sae, BatchTopKSAE) and float(sae.threshold) > 0
    _, x = planted(n=2048)  # the planted dictionary depends on the seed: keep the training one
    with torch.no_grad():
        l0 = (sae.encode(x) != 0).sum(-1).double().mean().item()
    assert l0 == pytest.approx(ACTIVE, rel=0.1)


def test_batchtopk_inference_does_not_depend_on_the_batch(trained):
    sae, _ = trained["batchtopk"]
    _, x = planted(n=64, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x[:1]), sae.encode(x)[:1])


# --- JumpReLU -----------------------------------------------------------------------------------------------


def test_jumprelu_thresholds_move_from_their_init(trained):
    sae, _ = trained["jumprelu"]
    assert isinstance(sae, JumpReLUSAE)
    moved = (sae.threshold.detach() - sae.params.threshold_init).abs()
    assert (moved > 1e-3).float().mean() > 0.5
    assert (sae.threshold >= 0).all()


def test_jumprelu_latents_are_gated_by_their_thresholds(trained):
    sae, _ = trained["jumprelu"]
    _, x = planted(n=64, seed=5)
    with torch.no_grad():
        f = sae.encode(x)
        pre = (x * sae.norm_scale - sae.b_dec) @ sae.W_enc + sae.b_enc
    torch.testing.assert_close(f, torch.where(pre > sae.threshold, pre, torch.zeros_like(pre)))


def test_jumprelu_threshold_gradient_uses_rectangle_kernel():
    """d loss / d theta_j = lambda * -(1/eps) * #(|pre - theta| < eps/2) / n from the L0 term, plus the
    reconstruction term -(theta/eps) * K * dL/df; with lambda only (decoder zeroed) it is the first."""
    sae = build(
        "jumprelu",
        normalize_input=False,
        b_dec_init="zero",
        sparsity_coefficient=1.0,
        bandwidth=0.5,
        threshold_init=1.0,
    )
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.W_dec.zero_()
        sae.b_enc.copy_(torch.linspace(0, 2, 128))  # pre = b_enc for every token
    x = torch.zeros(8, D_IN)
    sae.training_loss(x).loss.backward()
    inside = ((sae.b_enc - 1.0).abs() < 0.25).float()
    torch.testing.assert_close(sae.threshold.grad, -inside / 0.5)


def test_jumprelu_sparsity_penalty_lowers_l0(trained):
    _, x = planted()
    unpenalised = train_sae(
        build("jumprelu", sparsity_coefficient=0.0), TensorActivations(x), TRAINING, device=CPU, progress=False
    ).final["l0"]
    assert trained["jumprelu"][1]["l0"] < 0.5 * unpenalised


def test_batchtopk_ema_threshold_follows_smallest_kept_activation():
    """threshold_fit="ema" is SAELens's estimate: theta <- (1 - lr) theta + lr * min(kept activations)."""
    _, x = planted(n=256)
    sae = build("batchtopk", threshold_fit="ema", threshold_lr=0.5)
    step = sae.training_loss(x)
    expected = 0.5 * step.f[step.f > 0].min()
    torch.testing.assert_close(sae.threshold, expected)
    sae.after_training(TensorActivations(x), 256)
    torch.testing.assert_close(sae.threshold, expected)  # not refitted
