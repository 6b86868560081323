"""TopK SAE: training recovers a planted dictionary, sparsity is exact, the file format round-trips."""

from __future__ import annotations

import json

import pluggy
import pytest
import torch

from saex.model.activations import TensorActivations
from saex.plugin import hookspecs as spec
from saex.plugins.sae import topk
from saex.plugins.sae.topk import TopKSAE
from saex.sae.base import SAEFormatError, load_sae, save_sae
from saex.sae.training import TrainingConfig, train_sae

D_IN, N_FEATURES, ACTIVE = 32, 64, 3
CPU = torch.device("cpu")


def planted(n: int = 8192, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(dictionary [64, 32] of unit rows, tokens [n, 32]): each token a positive mix of 3 dictionary rows."""
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(N_FEATURES, D_IN, generator=g)
    dictionary /= dictionary.norm(dim=-1, keepdim=True)
    which = torch.rand(n, N_FEATURES, generator=g).argsort(-1)[:, :ACTIVE]
    coef = torch.rand(n, ACTIVE, generator=g) + 0.5
    return dictionary, torch.zeros(n, N_FEATURES).scatter_(-1, which, coef) @ dictionary


def build(**params: object) -> TopKSAE:
    arch = TopKSAE
    return arch.build(D_IN, arch.Params(**({"d_sae": 128, "k": ACTIVE} | params)), seed=0)


def test_topk_training_lowers_loss_and_recovers_planted_dictionary():
    dictionary, x = planted()
    sae = build(dead_steps_threshold=20)
    source = TensorActivations(x)
    sae.init_from_data(source)
    with torch.no_grad():
        initial = sae.training_loss(x).parts["mse"]
    result = train_sae(sae, source, TrainingConfig(tokens=120_000, batch_size=256, lr=3e-3), device=CPU, progress=False)
    with torch.no_grad():
        final = sae.training_loss(x).parts["mse"]
    assert final < 0.2 * initial
    assert result.final["explained_variance"] > 0.9
    best_cos = (dictionary @ sae.W_dec.detach().T).max(-1).values
    assert best_cos.mean() > 0.9


@pytest.fixture(scope="module")
def trained_sae() -> TopKSAE:
    _, x = planted()
    sae = build(dead_steps_threshold=20)
    train_sae(
        sae, TensorActivations(x), TrainingConfig(tokens=40_000, batch_size=256, lr=3e-3), device=CPU, progress=False
    )
    return sae


def test_topk_l0_is_exactly_k_on_trained_sae(trained_sae):
    _, x = planted(n=512, seed=1)
    with torch.no_grad():
        f = trained_sae.encode(x)
    assert torch.equal((f != 0).sum(-1), torch.full((512,), ACTIVE))


def test_topk_l0_never_exceeds_k_and_latents_are_nonnegative():
    sae = build(k=5)
    x = torch.randn(256, D_IN)
    with torch.no_grad():
        f = sae.encode(x)
    assert ((f != 0).sum(-1) <= 5).all()
    assert (f >= 0).all()


def test_topk_decoder_rows_have_unit_norm_after_training(trained_sae):
    norms = trained_sae.W_dec.detach().norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


def test_topk_sparse_forward_matches_dense_decode(trained_sae):
    _, x = planted(n=64, seed=2)
    with torch.no_grad():
        x_hat, f = trained_sae(x)
        torch.testing.assert_close(f, trained_sae.encode(x))
        torch.testing.assert_close(x_hat, trained_sae.decode(f), rtol=1e-5, atol=1e-5)


def test_normalisation_keeps_public_api_in_model_units(trained_sae):
    """An input scaled by 100 with norm_scale / 100 gives the same latents and a 100x reconstruction."""
    _, x = planted(n=64, seed=3)
    scaled = build(dead_steps_threshold=20)
    scaled.load_state_dict(trained_sae.state_dict())
    scaled.norm_scale.div_(100)
    with torch.no_grad():
        x_hat, f = trained_sae(x)
        x_hat_big, f_big = scaled(x * 100)
    torch.testing.assert_close(f_big, f, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x_hat_big, x_hat * 100, rtol=1e-4, atol=1e-3)


def test_fit_normalisation_gives_mean_norm_sqrt_d_in():
    x = torch.randn(1000, D_IN) * 37 + 5
    sae = build()
    sae.fit_normalisation(TensorActivations(x))
    mean_norm = (x * sae.norm_scale).norm(dim=-1).mean()
    torch.testing.assert_close(mean_norm, torch.tensor(D_IN**0.5), rtol=1e-5, atol=0)


def test_auxk_loss_is_active_only_when_latents_are_dead():
    _, x = planted(n=256)
    sae = build(dead_steps_threshold=2)
    parts = [sae.training_loss(x).parts["auxk"] for _ in range(3)]
    assert parts[0] == 0.0 and parts[1] == 0.0  # nothing can be dead before 2 steps
    assert parts[2] > 0.0  # 128 latents, 3 per token on a fixed batch: most never fire


def test_k_larger_than_d_sae_is_rejected():
    with pytest.raises(ValueError, match="k=200"):
        build(k=200)


def test_params_reject_unknown_keys():
    with pytest.raises(ValueError, match="bogus"):
        TopKSAE.Params(bogus=1)


def test_save_load_round_trip_is_bit_exact(trained_sae, tmp_path):
    save_sae(trained_sae, tmp_path)
    loaded = load_sae(tmp_path, {"topk": TopKSAE})
    assert isinstance(loaded, TopKSAE)
    assert loaded.params == trained_sae.params
    original_state, loaded_state = trained_sae.state_dict(), loaded.state_dict()
    assert original_state.keys() == loaded_state.keys()
    for name, tensor in original_state.items():
        assert torch.equal(tensor, loaded_state[name]), name
    _, x = planted(n=128, seed=4)
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), trained_sae.encode(x))
        f = trained_sae.encode(x)
        assert torch.equal(loaded.decode(f), trained_sae.decode(f))


def test_saved_cfg_is_readable_json(trained_sae, tmp_path):
    save_sae(trained_sae, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == "topk"
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"]) == (D_IN, 128, "float32")
    assert cfg["params"]["k"] == ACTIVE
    assert cfg["norm_scale"] == pytest.approx(float(trained_sae.norm_scale))


def test_load_unknown_architecture_lists_valid_names(trained_sae, tmp_path):
    save_sae(trained_sae, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps(cfg | {"architecture": "gated"}))
    with pytest.raises(SAEFormatError, match=r"cfg\.json.*unknown SAE architecture 'gated'; valid: topk"):
        load_sae(tmp_path, {"topk": TopKSAE})


def test_load_missing_or_invalid_cfg_names_the_file(tmp_path):
    with pytest.raises(SAEFormatError, match=r"cfg\.json: missing"):
        load_sae(tmp_path, {"topk": TopKSAE})
    (tmp_path / "cfg.json").write_text("{not json")
    with pytest.raises(SAEFormatError, match=r"cfg\.json: invalid SAE config"):
        load_sae(tmp_path, {"topk": TopKSAE})


def test_topk_registers_through_the_pluggy_hook():
    manager = pluggy.PluginManager(spec.PROJECT)
    manager.add_hookspecs(spec)
    manager.register(topk)
    registered: list[object] = []
    manager.hook.register_sae_architectures(register=registered.append)
    assert [component.name for component in registered] == ["topk"]
