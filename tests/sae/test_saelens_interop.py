"""SAELens format both ways: SAEs built and saved by SAELens 6 load into our classes with the same encode and
decode (to 1e-5), and ours saved with ``save_saelens`` load in SAELens with the same results."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from saex.plugins.sae.batchtopk import BatchTopKSAE
from saex.plugins.sae.jumprelu import JumpReLUSAE
from saex.plugins.sae.relu import ReLUSAE
from saex.plugins.sae.topk import TopKSAE
from saex.sae.base import SAE, SAEFormatError, SAELensExport, SAELensImport, save_sae
from saex.sae.formats import load_pretrained
from saex.sae.saelens import load_saelens, save_saelens

sae_lens = pytest.importorskip("sae_lens")
from sae_lens import SAE as LensSAE  # noqa: E402
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig  # noqa: E402
from sae_lens.saes.jumprelu_sae import JumpReLUSAE as LensJumpReLU  # noqa: E402
from sae_lens.saes.jumprelu_sae import JumpReLUSAEConfig  # noqa: E402
from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig  # noqa: E402
from sae_lens.saes.topk_sae import TopKSAE as LensTopK  # noqa: E402
from sae_lens.saes.topk_sae import TopKSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig  # noqa: E402

D_IN, D_SAE, K = 24, 96, 6
TOL = {"rtol": 1e-5, "atol": 1e-5}
ARCHITECTURES = {"relu": ReLUSAE, "topk": TopKSAE, "jumprelu": JumpReLUSAE, "batchtopk": BatchTopKSAE}


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    yield


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Every weight random (SAELens initialises biases and thresholds to zero, which would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if name.startswith("W") else 0.1))
        if hasattr(module, "threshold"):
            module.threshold.copy_(torch.rand(module.threshold.shape, generator=g) * 0.3)


def inputs(n: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed))


def assert_same_sae(ours: SAE, lens: torch.nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        f_ours, f_lens = ours.encode(x), lens.encode(x)
        assert torch.equal(f_ours != 0, f_lens != 0)  # the same latents fire
        torch.testing.assert_close(f_ours, f_lens, **TOL)
        torch.testing.assert_close(ours.decode(f_lens), lens.decode(f_lens), **TOL)
        torch.testing.assert_close(ours(x)[0], lens(x), **TOL)


# --- SAELens -> ours --------------------------------------------------------------------------------------


def lens_standard() -> torch.nn.Module:
    return StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE))


def lens_standard_no_b_dec_input() -> torch.nn.Module:
    return StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=False))


def lens_topk() -> torch.nn.Module:
    return LensTopK(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K))


def lens_topk_rescaled() -> torch.nn.Module:
    return LensTopK(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, rescale_acts_by_decoder_norm=True))


def lens_jumprelu() -> torch.nn.Module:
    return LensJumpReLU(JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE))


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lens_standard, ReLUSAE),
        (lens_standard_no_b_dec_input, ReLUSAE),
        (lens_topk, TopKSAE),
        (lens_topk_rescaled, TopKSAE),
        (lens_jumprelu, JumpReLUSAE),
    ],
)
def test_sae_saved_by_saelens_loads_with_same_encode_and_decode(make: Callable, expected: type, tmp_path: Path):
    lens = make()
    randomise(lens, seed=0)
    lens.save_model(tmp_path)
    ours = load_saelens(tmp_path, ARCHITECTURES)
    assert type(ours) is expected
    assert_same_sae(ours, LensSAE.load_from_disk(tmp_path), inputs())


def trained_lens_batchtopk() -> BatchTopKTrainingSAE:
    lens = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K))
    randomise(lens, seed=0)
    with torch.no_grad():
        lens.W_dec.mul_(torch.rand(D_SAE, 1, generator=torch.Generator().manual_seed(5)) + 0.5)  # norms != 1
    lens.topk_threshold = torch.tensor(0.25, dtype=torch.double)
    return lens


def test_batchtopk_saved_by_saelens_for_inference_loads_as_batchtopk(tmp_path: Path):
    lens = trained_lens_batchtopk()
    lens.save_inference_model(tmp_path)  # what SAELens's training runner writes at the end: a jumprelu
    assert json.loads((tmp_path / "cfg.json").read_text())["architecture"] == "jumprelu"
    ours = load_saelens(tmp_path, ARCHITECTURES)
    assert isinstance(ours, BatchTopKSAE)
    assert ours.params.k == K
    assert float(ours.threshold) == pytest.approx(0.25)
    assert_same_sae(ours, LensSAE.load_from_disk(tmp_path), inputs())


def test_batchtopk_training_checkpoint_of_saelens_loads_like_its_inference_save(tmp_path: Path):
    lens = trained_lens_batchtopk()
    lens.save_model(tmp_path / "checkpoint")  # a training checkpoint: architecture batchtopk, topk_threshold
    lens.save_inference_model(tmp_path / "inference")
    ours = load_saelens(tmp_path / "checkpoint", ARCHITECTURES)
    assert isinstance(ours, BatchTopKSAE)
    assert_same_sae(ours, LensSAE.load_from_disk(tmp_path / "inference"), inputs())


def test_topk_training_checkpoint_with_decoder_norm_rescaling_matches_saelens(tmp_path: Path):
    lens = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K))
    randomise(lens, seed=2)
    lens.save_model(tmp_path)
    ours = load_saelens(tmp_path, ARCHITECTURES)
    with torch.no_grad():
        x = inputs()
        torch.testing.assert_close(ours.encode(x), lens.encode(x), **TOL)
        torch.testing.assert_close(ours(x)[0], lens(x), **TOL)


# --- ours -> SAELens --------------------------------------------------------------------------------------


def ours_randomised(name: str) -> SAE:
    arch = ARCHITECTURES[name]
    params = {"d_sae": D_SAE} | ({"k": K} if name in ("topk", "batchtopk") else {})
    sae = arch.build(D_IN, arch.Params(**params), seed=0)
    randomise(sae, seed=3)
    with torch.no_grad():
        sae.norm_scale.fill_(0.37)  # input normalisation must be folded into what SAELens reads
        if name == "batchtopk":
            sae.threshold.fill_(0.2)
    return sae.eval()


@pytest.mark.parametrize("name", ["relu", "topk", "jumprelu", "batchtopk"])
def test_our_sae_saved_for_saelens_loads_there_with_same_encode_and_decode(name: str, tmp_path: Path):
    ours = ours_randomised(name)
    save_saelens(ours, tmp_path, metadata={"hook_name": "layers.3.resid_post"})
    lens = LensSAE.load_from_disk(tmp_path)
    assert lens.cfg.metadata.hook_name == "layers.3.resid_post"
    x = inputs() * 5
    with torch.no_grad():
        f_ours, f_lens = ours.encode(x), lens.encode(x)
        assert torch.equal(f_ours != 0, f_lens != 0)
        torch.testing.assert_close(f_lens, f_ours, **TOL)
        torch.testing.assert_close(lens.decode(f_ours), ours.decode(f_ours), **TOL)


def test_our_sae_with_a_per_token_layer_norm_is_saved_as_saelens_layer_norm(tmp_path: Path):
    ours = ours_randomised("topk")
    with torch.no_grad():
        ours.layer_norm.fill_(True)
    save_saelens(ours, tmp_path)
    lens, back = LensSAE.load_from_disk(tmp_path), load_saelens(tmp_path, ARCHITECTURES)
    assert lens.cfg.normalize_activations == "layer_norm" and bool(back.layer_norm)
    x = inputs() * 5 + 2
    with torch.no_grad():
        torch.testing.assert_close(lens.encode(x), ours.encode(x), **TOL)
        torch.testing.assert_close(lens(x), ours(x)[0], **TOL)
        torch.testing.assert_close(back(x)[0], ours(x)[0], **TOL)


@pytest.mark.parametrize("name", ["relu", "topk", "jumprelu", "batchtopk"])
def test_saelens_round_trip_restores_architecture_and_params(name: str, tmp_path: Path):
    ours = ours_randomised(name)
    save_saelens(ours, tmp_path)
    back = load_pretrained(tmp_path, ARCHITECTURES)
    assert type(back) is type(ours)
    assert back.params == ours.params
    assert float(back.norm_scale) == 1.0  # folded
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(back(x)[0], ours(x)[0], **TOL)


def test_load_pretrained_reads_saex_format_too(tmp_path: Path):
    ours = ours_randomised("topk")
    save_sae(ours, tmp_path)
    back = load_pretrained(tmp_path, ARCHITECTURES)
    assert torch.equal(back.W_enc, ours.W_enc) and torch.equal(back.norm_scale, ours.norm_scale)


# --- an architecture the spine does not know -----------------------------------------------------------------


class ShiftedReLUSAE(ReLUSAE):
    """A third-party architecture with its own SAELens name and an extra tensor: f = ReLU(pre - shift)."""

    name = "shifted_relu"
    saelens_architectures = ("shifted",)

    def __init__(self, d_in: int, params: ReLUSAE.Params, *, seed: int = 0):
        super().__init__(d_in, params, seed=seed)
        self.shift = torch.nn.Parameter(torch.zeros(self.d_sae))

    def encode_scaled(self, x: torch.Tensor) -> torch.Tensor:
        return (self._pre(x) - self.shift).relu()

    @classmethod
    def from_saelens(cls, cfg, extra):
        return SAELensImport(cls.saelens_params(cfg), {"shift": extra.pop("shift")})

    def to_saelens(self) -> SAELensExport:
        return SAELensExport({"architecture": "shifted"}, {"shift": self.shift.detach()})


def test_new_architecture_round_trips_through_its_own_saelens_hooks(tmp_path: Path):
    ours = ShiftedReLUSAE.build(D_IN, ShiftedReLUSAE.Params(d_sae=D_SAE), seed=0)
    randomise(ours, seed=4)
    with torch.no_grad():
        ours.norm_scale.fill_(0.37)
    save_saelens(ours, tmp_path)
    assert json.loads((tmp_path / "cfg.json").read_text())["architecture"] == "shifted"
    back = load_pretrained(tmp_path, ARCHITECTURES | {"shifted_relu": ShiftedReLUSAE})
    assert type(back) is ShiftedReLUSAE and back.params == ours.params
    assert torch.equal(back.shift, ours.shift.detach())
    x = inputs()
    with torch.no_grad():
        assert bool((ours.encode(x) > 0).any())
        torch.testing.assert_close(back.encode(x), ours.encode(x), **TOL)
        torch.testing.assert_close(back(x)[0], ours(x)[0], **TOL)


def test_a_tensor_no_architecture_reads_is_refused(tmp_path: Path):
    save_saelens(ShiftedReLUSAE.build(D_IN, ShiftedReLUSAE.Params(d_sae=D_SAE)), tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps(cfg | {"architecture": "standard"}))
    with pytest.raises(SAEFormatError, match=r"unexpected tensors \['shift'\] for 'standard'"):
        load_saelens(tmp_path, ARCHITECTURES)


class WithoutSAELens(ReLUSAE):
    name = "no_saelens"
    saelens_architectures = ()
    to_saelens = SAE.to_saelens


def test_architecture_without_saelens_hooks_is_refused_on_save(tmp_path: Path):
    with pytest.raises(SAEFormatError, match="'no_saelens' has no SAELens equivalent"):
        save_saelens(WithoutSAELens.build(D_IN, WithoutSAELens.Params(d_sae=D_SAE)), tmp_path)
    assert not tmp_path.joinpath("cfg.json").exists()


# --- errors -----------------------------------------------------------------------------------------------


def test_per_token_normalisation_is_refused_with_the_file_named(tmp_path: Path):
    lens = lens_standard()
    lens.save_model(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps(cfg | {"normalize_activations": "constant_norm_rescale"}))
    with pytest.raises(SAEFormatError, match=r"normalize_activations='constant_norm_rescale' is not supported"):
        load_saelens(tmp_path, ARCHITECTURES)


def test_unknown_saelens_architecture_lists_supported(tmp_path: Path):
    lens_standard().save_model(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps(cfg | {"architecture": "gated"}))
    with pytest.raises(SAEFormatError, match="'gated' has no saex equivalent; supported: standard"):
        load_saelens(tmp_path, ARCHITECTURES)


def test_missing_directory_names_the_file(tmp_path: Path):
    with pytest.raises(SAEFormatError, match=r"nowhere: no such file or directory"):
        load_pretrained(tmp_path / "nowhere", ARCHITECTURES)
