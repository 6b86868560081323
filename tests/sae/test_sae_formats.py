"""Every format ``loaded:`` reads, written by the test in that format's documented layout (SAELens writes its own),
loaded by saex with encode/decode equal to the format's own code: SAELens's classes, and for Gemma Scope, OpenAI's
sparse_autoencoder and EleutherAI's sparsify (not installed) their encode/decode written out below from their
published source. Float32 agrees to 1e-6 relative to the largest value; other dtypes to their rounding."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from saex.config.sources import parse_source
from saex.plugin.manager import load_plugins
from saex.plugins.sae.jumprelu import JumpReLUSAE
from saex.plugins.sae.relu import ReLUSAE
from saex.plugins.sae.topk import TopKSAE
from saex.sae.base import SAE, SAEFormatError
from saex.sae.formats import FORMAT_NAMES, describe, detect_format, load_pretrained

sae_lens = pytest.importorskip("sae_lens")
from sae_lens import SAE as LensSAE  # noqa: E402
from sae_lens.saes.jumprelu_sae import JumpReLUSAE as LensJumpReLU  # noqa: E402
from sae_lens.saes.jumprelu_sae import JumpReLUSAEConfig  # noqa: E402
from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig  # noqa: E402
from sae_lens.saes.topk_sae import TopKSAE as LensTopK  # noqa: E402
from sae_lens.saes.topk_sae import TopKSAEConfig  # noqa: E402

D_IN, D_SAE, K = 24, 96, 6
REL = 1e-6  # float32: max |ours - reference| / max |reference|
DTYPE_REL = {torch.float32: REL, torch.float64: REL, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    yield


@pytest.fixture(scope="module")
def architectures():
    plugins = load_plugins(entry_points=False)
    return {n: plugins.get("sae", n) for n in plugins.names("sae")}


def rand(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def inputs(n: int = 64) -> torch.Tensor:
    return rand(n, D_IN, seed=100) * 3 + 1  # an offset and scale, so centring and layer norm matter


def rel_err(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours.double() - reference.double()).abs().max() / reference.double().abs().max()).item()


def assert_same(ours: torch.Tensor, reference: torch.Tensor, rel: float = REL) -> None:
    assert ours.shape == reference.shape
    assert rel_err(ours, reference) <= rel, rel_err(ours, reference)


# --- SAELens in every dtype ---------------------------------------------------------------------------------


def lens_sae(kind: str, dtype: str, **cfg: object) -> torch.nn.Module:
    made = {
        "standard": lambda: StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, dtype=dtype, **cfg)),
        "topk": lambda: LensTopK(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, dtype=dtype, **cfg)),
        "jumprelu": lambda: LensJumpReLU(JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE, dtype=dtype, **cfg)),
    }[kind]()
    with torch.no_grad():
        for i, (name, p) in enumerate(made.named_parameters()):
            p.copy_(rand(*p.shape, seed=i, scale=0.3 if name.startswith("W") else 0.1))
        if kind == "jumprelu":
            made.threshold.copy_(torch.rand(D_SAE, generator=torch.Generator().manual_seed(9)) * 0.3)
    return made


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
@pytest.mark.parametrize("kind", ["standard", "topk", "jumprelu"])
def test_saelens_sae_of_any_dtype_computes_as_saelens_does(
    kind: str, dtype: str, architectures, tmp_path: Path
) -> None:
    lens_sae(kind, dtype).save_model(tmp_path)
    ours = load_pretrained(tmp_path, architectures)
    lens = LensSAE.load_from_disk(tmp_path)
    torch_dtype = getattr(torch, dtype)
    assert ours.W_enc.dtype == torch_dtype and detect_format(tmp_path) == "saelens"
    x = inputs()  # float32 activations, as the runner gives them
    with torch.no_grad():
        f, f_lens = ours.encode(x), lens.encode(x)
        assert f.dtype == torch_dtype and torch.equal(f, f_lens)  # the same operations in the same dtype
        assert torch.equal(ours.decode(f), lens.decode(f_lens))
        x_hat, f_forward = ours(x)
        assert x_hat.dtype == torch.float32 and torch.equal(f_forward, f)  # the reconstruction in the input's dtype
        assert_same(x_hat, lens(x), DTYPE_REL[torch_dtype])  # TopK decodes sparsely: another summation order


def test_saelens_layer_norm_is_openais_per_token_norm(architectures, tmp_path: Path) -> None:
    lens = lens_sae("topk", "float32", normalize_activations="layer_norm")
    lens.save_model(tmp_path)
    ours = load_pretrained(tmp_path, architectures)
    reloaded = LensSAE.load_from_disk(tmp_path)
    x = inputs()
    with torch.no_grad():
        assert bool(ours.layer_norm)
        assert_same(ours.encode(x), reloaded.encode(x))
        assert_same(ours(x)[0], reloaded(x))  # SAELens's forward: encode keeps the mean and std for decode
        with pytest.raises(ValueError, match="per-token layer norm: decoding needs each token's input mean"):
            ours.decode(ours.encode(x))


def test_config_that_does_not_match_its_weights_is_refused_before_building(architectures, tmp_path: Path) -> None:
    lens_sae("standard", "float32").save_model(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps(cfg | {"d_sae": 10**9}))
    with pytest.raises(SAEFormatError, match=r"W_enc has shape \(24, 96\), the config says \(24, 1000000000\)"):
        load_pretrained(tmp_path, architectures)


# --- Gemma Scope ----------------------------------------------------------------------------------------------


def gemmascope_params(seed: int = 0) -> dict[str, np.ndarray]:
    """A params.npz's arrays, as the Gemma Scope release documents them."""
    return {
        "W_enc": rand(D_IN, D_SAE, seed=seed, scale=0.3).numpy(),
        "W_dec": rand(D_SAE, D_IN, seed=seed + 1, scale=0.3).numpy(),
        "b_enc": rand(D_SAE, seed=seed + 2, scale=0.1).numpy(),
        "b_dec": rand(D_IN, seed=seed + 3, scale=0.5).numpy(),
        "threshold": (torch.rand(D_SAE, generator=torch.Generator().manual_seed(seed + 4)) * 0.5).numpy(),
    }


def gemmascope_encode(p: dict[str, np.ndarray], x: torch.Tensor) -> torch.Tensor:
    """The Gemma Scope tutorial's JumpReLUSAE.encode: no b_dec subtracted from the input."""
    pre = x @ torch.from_numpy(p["W_enc"]) + torch.from_numpy(p["b_enc"])
    return (pre > torch.from_numpy(p["threshold"])) * F.relu(pre)


def gemmascope_decode(p: dict[str, np.ndarray], f: torch.Tensor) -> torch.Tensor:
    return f @ torch.from_numpy(p["W_dec"]) + torch.from_numpy(p["b_dec"])


def write_gemmascope(root: Path, params: dict[str, np.ndarray], repo: str = "gemma-scope-2b-pt-res") -> Path:
    folder = root / repo / "layer_3" / "width_16k" / "average_l0_10"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **params)
    return folder


def test_gemma_scope_npz_loads_as_jumprelu_with_its_encode_and_decode(architectures, tmp_path: Path) -> None:
    params = gemmascope_params()
    folder = write_gemmascope(tmp_path, params)
    info = describe(folder)
    assert (info.format, info.d_in, info.d_sae) == ("gemmascope", D_IN, D_SAE)
    assert (info.hook, info.saex_hook) == ("blocks.3.hook_resid_post", "layers.3.resid_post")
    ours = load_pretrained(folder, architectures)
    assert isinstance(ours, JumpReLUSAE) and ours.W_enc.dtype == torch.float32
    x = inputs()
    with torch.no_grad():
        f = ours.encode(x)
        reference = gemmascope_encode(params, x)
        assert torch.equal(f != 0, reference != 0) and 0 < (f != 0).float().mean() < 0.9
        assert_same(f, reference)
        assert_same(ours.decode(reference), gemmascope_decode(params, reference))
        assert_same(ours(x)[0], gemmascope_decode(params, reference))
        # SAELens's reading of the same file (its gemma_2 loader: a jumprelu without b_dec on the input)
        lens = LensJumpReLU(JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=False))
        lens.load_state_dict({k: torch.from_numpy(v) for k, v in params.items()})
        assert_same(f, lens.encode(x))


def test_gemma_scope_hook_is_read_from_the_hub_layout(tmp_path: Path) -> None:
    params = gemmascope_params()
    mlp = describe(write_gemmascope(tmp_path, params, "models--google--gemma-scope-9b-it-mlp-canonical"))
    att = describe(write_gemmascope(tmp_path, params, "gemma-scope-2b-pt-att"))
    elsewhere = tmp_path / "mine"
    elsewhere.mkdir()
    np.savez(elsewhere / "params.npz", **params)
    assert (mlp.hook, mlp.saex_hook) == ("blocks.3.hook_mlp_out", "layers.3.mlp_out")
    assert (att.hook, att.saex_hook) == ("blocks.3.attn.hook_z", None)  # no saex hook point reads hook_z
    assert describe(elsewhere).hook is None


def test_npz_that_is_not_gemma_scope_is_refused(architectures, tmp_path: Path) -> None:
    params = gemmascope_params()
    np.savez(tmp_path / "short.npz", **(params | {"threshold": params["threshold"][:5]}))
    with pytest.raises(SAEFormatError, match=r"threshold has shape \(5,\), the config says \(96,\)"):
        load_pretrained(tmp_path / "short.npz", architectures)
    np.savez(tmp_path / "objects.npz", **(params | {"b_dec": np.array([object()] * D_IN)}))
    with pytest.raises(SAEFormatError, match="b_dec holds object, not floating-point numbers"):
        load_pretrained(tmp_path / "objects.npz", architectures)


# --- OpenAI sparse_autoencoder ----------------------------------------------------------------------------------


def openai_state(activation: str = "TopK", postact_fn: str = "ReLU", seed: int = 0) -> dict[str, object]:
    """``Autoencoder.state_dict()`` of openai/sparse_autoencoder (model.py), tensors and the activation entries."""
    state: dict[str, object] = {
        "pre_bias": rand(D_IN, seed=seed, scale=0.2),
        "encoder.weight": rand(D_SAE, D_IN, seed=seed + 1, scale=0.3),
        "latent_bias": rand(D_SAE, seed=seed + 2, scale=0.1),
        "decoder.weight": rand(D_IN, D_SAE, seed=seed + 3, scale=0.3),
        "stats_last_nonzero": torch.zeros(D_SAE, dtype=torch.long),
        "latents_activation_frequency": torch.ones(D_SAE),
        "latents_mean_square": torch.zeros(D_SAE),
        "activation": activation,
    }
    if activation == "TopK":
        state["activation_state_dict"] = {"k": K, "postact_fn": postact_fn}
    return state


def openai_forward(state: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents, recons) as ``Autoencoder.from_state_dict(state)`` computes them: LN on the input for TopK
    (``normalize = activation == "TopK"``), encoder(x - pre_bias) + latent_bias, TopK(k) with ReLU on the
    values or ReLU, decoder(latents) + pre_bias, LN undone."""
    normalize = state["activation"] == "TopK"
    if normalize:
        mu = x.mean(dim=-1, keepdim=True)
        x = x - mu
        std = x.std(dim=-1, keepdim=True)
        x = x / (std + 1e-5)
    pre = F.linear(x - state["pre_bias"], state["encoder.weight"], state["latent_bias"])
    if normalize:
        top = torch.topk(pre, k=state["activation_state_dict"]["k"], dim=-1)
        latents = torch.zeros_like(pre).scatter_(-1, top.indices, F.relu(top.values))
    else:
        latents = F.relu(pre)
    recons = F.linear(latents, state["decoder.weight"]) + state["pre_bias"]
    return latents, recons * std + mu if normalize else recons


def write_openai(root: Path, state: dict, location: str = "resid_post_mlp_v5_32k", layer: int = 6) -> Path:
    path = root / location / "autoencoders" / f"{layer}.pt"
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return path


@pytest.mark.parametrize(("activation", "expected"), [("TopK", TopKSAE), ("ReLU", ReLUSAE)])
def test_openai_checkpoint_loads_with_its_encode_and_decode(
    activation: str, expected: type[SAE], architectures, tmp_path: Path
) -> None:
    state = openai_state(activation)
    path = write_openai(tmp_path, dict(state))
    ours = load_pretrained(path, architectures)
    assert type(ours) is expected and bool(ours.layer_norm) == (activation == "TopK")
    x = inputs()
    latents, recons = openai_forward(state, x)
    with torch.no_grad():
        f, x_hat = ours.encode(x), ours(x)[0]
        assert torch.equal(f != 0, latents != 0) and bool((f != 0).any())
        assert_same(f, latents)
        assert_same(x_hat, recons)
        if activation == "ReLU":
            assert_same(ours.decode(latents), recons)


def test_openai_hook_is_read_from_the_location_folder(tmp_path: Path) -> None:
    state = openai_state()
    cases = {
        "resid_post_mlp_v5_32k": ("blocks.6.hook_resid_post", "layers.6.resid_post"),
        "resid_delta_mlp_v4": ("blocks.6.hook_mlp_out", "layers.6.mlp_out"),
        "resid_delta_attn_v5_128k": ("blocks.6.hook_attn_out", "layers.6.attn_out"),
        "resid_post_attn_v5_32k": ("blocks.6.hook_resid_mid", None),
    }
    for location, expected in cases.items():
        info = describe(write_openai(tmp_path, dict(state), location))
        assert (info.format, info.d_in, info.d_sae, info.hook, info.saex_hook) == ("openai", D_IN, D_SAE, *expected)


class Payload:
    """Anything but tensors and plain data: the weights-only unpickler must refuse to build it."""


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        ({"activation": "Identity"}, "activation 'Identity' has no saex equivalent"),
        ({"activation_state_dict": {"k": K, "postact_fn": "Identity"}}, "TopK with postact_fn 'Identity'"),
        ({"decoder.linear.weight": torch.zeros(1)}, r"entries \['decoder.linear.weight'\] are not"),
        ({"latent_bias": torch.zeros(D_SAE + 1)}, r"latent_bias has shape \(97,\), the config says \(96,\)"),
        ({"payload": Payload()}, "not a torch checkpoint the weights-only loader reads"),
    ],
)
def test_openai_checkpoint_saex_cannot_express_is_refused(
    edit: dict, expected: str, architectures, tmp_path: Path
) -> None:
    path = write_openai(tmp_path, openai_state() | edit)
    with pytest.raises(SAEFormatError, match=expected):
        load_pretrained(path, architectures)


# --- EleutherAI sparsify ----------------------------------------------------------------------------------------


def sparsify_state(dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    """``SparseCoder``'s state dict (save_to_disk): encoder as an nn.Linear, W_dec [num_latents, d_in], b_dec."""
    return {
        "encoder.weight": rand(D_SAE, D_IN, seed=seed, scale=0.3).to(dtype),
        "encoder.bias": rand(D_SAE, seed=seed + 1, scale=0.1).to(dtype),
        "W_dec": rand(D_SAE, D_IN, seed=seed + 2, scale=0.3).to(dtype),
        "b_dec": rand(D_IN, seed=seed + 3, scale=0.5).to(dtype),
    }


def sparsify_forward(state: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dense latents, reconstruction) as ``SparseCoder.encode`` / ``decode`` compute them, in the weights' dtype:
    ReLU(Linear(x - b_dec)), top-k, then the kept latents' W_dec rows summed (``eager_decode``) plus b_dec."""
    x = x.to(state["b_dec"].dtype) - state["b_dec"]
    pre = F.relu(F.linear(x, state["encoder.weight"], state["encoder.bias"]))
    values, indices = torch.topk(pre, K, dim=-1, sorted=False)
    decoded = F.embedding_bag(indices, state["W_dec"], per_sample_weights=values, mode="sum") + state["b_dec"]
    return torch.zeros_like(pre).scatter_(-1, indices, values), decoded


def write_sparsify(root: Path, state: dict[str, torch.Tensor], hookpoint: str = "layers.3", **cfg: object) -> Path:
    folder = root / hookpoint
    folder.mkdir(parents=True)
    config = {"activation": "topk", "expansion_factor": 4, "normalize_decoder": True, "num_latents": D_SAE, "k": K}
    config |= {"multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D_IN}
    (folder / "cfg.json").write_text(json.dumps(config | cfg))
    save_file(state, str(folder / "sae.safetensors"))
    return folder


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparsify_sae_loads_as_topk_with_its_encode_and_decode(dtype: torch.dtype, architectures, tmp_path: Path):
    state = sparsify_state(dtype)
    folder = write_sparsify(tmp_path, state)
    info = describe(folder)
    assert (info.format, info.d_sae, info.hook, info.saex_hook) == (
        "sparsify",
        D_SAE,
        "layers.3",
        "layers.3.resid_post",
    )
    ours = load_pretrained(folder, architectures)
    assert isinstance(ours, TopKSAE) and ours.params.k == K and ours.W_enc.dtype == dtype
    x = inputs()
    latents, decoded = sparsify_forward(state, x)
    with torch.no_grad():
        f = ours.encode(x)
        # sparsify's fused Linear rounds the bias add once, saex (as SAELens) twice: in bfloat16 that one ulp
        # reorders a few near-tied top-k values, so rows compare where the same latents were kept
        same = (f != 0).eq(latents != 0).all(-1)
        assert same.all() if dtype == torch.float32 else same.float().mean() >= 0.9
        assert_same(f[same], latents[same], DTYPE_REL[dtype])
        assert_same(ours(x)[0][same], decoded[same], DTYPE_REL[dtype])
        assert_same(ours.decode(latents), decoded, DTYPE_REL[dtype])


@pytest.mark.parametrize(
    ("cfg", "extra", "expected"),
    [
        ({"activation": "groupmax"}, {}, "activation='groupmax' has no saex equivalent"),
        ({"transcode": True}, {}, "transcode=True has no saex equivalent"),
        ({}, {"W_skip": torch.zeros(D_IN, D_IN)}, r"tensors \['W_skip'\] are not supported"),
        ({"num_latents": 2 * D_SAE}, {}, r"encoder.weight has shape \(96, 24\), the config says \(192, 24\)"),
    ],
)
def test_sparsify_sae_saex_cannot_express_is_refused(cfg: dict, extra: dict, expected: str, architectures, tmp_path):
    folder = write_sparsify(tmp_path, sparsify_state() | extra, **cfg)
    with pytest.raises(SAEFormatError, match=expected):
        load_pretrained(folder, architectures)


# --- detection and naming ----------------------------------------------------------------------------------------


def test_format_is_detected_from_the_files_or_named_in_the_source(tmp_path: Path) -> None:
    lens_sae("standard", "float32").save_model(tmp_path / "lens")
    found = {
        "saelens": tmp_path / "lens",
        "gemmascope": write_gemmascope(tmp_path, gemmascope_params()),
        "openai": write_openai(tmp_path, openai_state()),
        "sparsify": write_sparsify(tmp_path, sparsify_state()),
    }
    assert {name: detect_format(path) for name, path in found.items()} == {name: name for name in found}
    assert parse_source("loaded:gemmascope:/x/params.npz").format == "gemmascope"
    assert parse_source("loaded:/x/y").format is None and parse_source("loaded:c:/x").path == "c:/x"
    (tmp_path / "empty").mkdir()
    with pytest.raises(SAEFormatError, match="no SAE saex can read") as err:
        detect_format(tmp_path / "empty")
    assert all(name in str(err.value) for name in FORMAT_NAMES)
