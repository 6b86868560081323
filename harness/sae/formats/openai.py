"""OpenAI's sparse_autoencoder (Gao et al. 2024; github.com/openai/sparse_autoencoder): the GPT-2 small SAEs,
each an ``Autoencoder.state_dict()`` saved with ``torch.save`` at ``<location>[_v4|_v5_32k|_v5_128k]/
autoencoders/<layer>.pt`` (``paths.py``). Read with torch's weights-only unpickler (tensors, strings, numbers and
dicts; never arbitrary objects), memory-mapped, so the shapes are checked before any weight is read.

Their ``Autoencoder``: latents = activation(encoder(x - pre_bias) + latent_bias), recons = decoder(latents) +
pre_bias, with ``encoder.weight [n_latents, d]`` and ``decoder.weight [d, n_latents]``: W_enc = encoder.weight^T,
b_enc = latent_bias, W_dec = decoder.weight^T, b_dec = pre_bias (SAELens's ``apply_b_dec_to_input``). The
``activation`` entry names the activation: ``ReLU`` (v1, v4) is SAELens's ``standard``; ``TopK`` (v5, k in
``activation_state_dict``) is ``topk``, plus, as ``Autoencoder.from_state_dict`` decides (``normalize =
activation == "TopK"``), OpenAI's per-token layer norm of the input, undone on the reconstruction (``LN``,
SAELens's ``layer_norm``). Refused: other activations (``Identity`` has no sparsity), a TopK whose ``postact_fn``
is not ReLU (negative latents), tensors an untied ``Autoencoder`` does not have.

The hook comes from the ``<location>`` folder, in TransformerLens's words as OpenAI's README maps them:
``resid_post_mlp`` -> ``blocks.L.hook_resid_post``, ``resid_delta_mlp`` -> ``hook_mlp_out``, ``resid_delta_attn``
-> ``hook_attn_out``, ``resid_post_attn`` -> ``hook_resid_mid``, ``mlp_post_act`` -> ``mlp.hook_post`` (saex has
no hook point for the last two).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from saex.plugin.protocols import SAEArchitecture
from saex.sae.base import SAE, SAEFile, SAEFormatError, check_shapes
from saex.sae.saelens import sae_from_saelens, saex_hook

FILES = "<layer>.pt (an Autoencoder state_dict saved by torch.save)"
WEIGHTS = ("encoder.weight", "decoder.weight", "pre_bias", "latent_bias")
STATISTICS = ("stats_last_nonzero", "latents_activation_frequency", "latents_mean_square")  # training only
_LOCATION = re.compile(r"^(resid_post_mlp|resid_delta_mlp|resid_delta_attn|resid_post_attn|mlp_post_act)(_v\w+)?$")
_TL_SITES = {
    "resid_post_mlp": "hook_resid_post",
    "resid_delta_mlp": "hook_mlp_out",
    "resid_delta_attn": "hook_attn_out",
    "resid_post_attn": "hook_resid_mid",
    "mlp_post_act": "mlp.hook_post",
}


def detect(path: Path) -> bool:
    return path.is_file() and path.suffix == ".pt"


def describe(path: Path) -> SAEFile:
    cfg, _ = _read(path)
    hook = _hook(path)
    return SAEFile("openai", path, cfg["d_in"], cfg["d_sae"], hook, saex_hook(hook))


def load(path: Path, architectures: Mapping[str, SAEArchitecture]) -> SAE:
    cfg, tensors = _read(path)
    return sae_from_saelens(cfg | {"metadata": {"hook_name": _hook(path)}}, tensors, architectures, path)


def _read(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(a SAELens config, the four weights in SAELens's names) for the checkpoint at ``path``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # the weights-only unpickler raises several types for what it refuses
        raise SAEFormatError(f"{path}: not a torch checkpoint the weights-only loader reads: {e}") from e
    if not isinstance(state, dict):
        raise SAEFormatError(f"{path}: expected a state dict, got {type(state).__name__}")
    activation = state.pop("activation", "ReLU")  # Autoencoder.from_state_dict's default
    settings = state.pop("activation_state_dict", {})
    # torch's state_dict recursion also stores TopK's own entries as ``activation.k``, ``activation.postact_fn``
    nested = {k.removeprefix("activation."): state.pop(k) for k in list(state) if k.startswith("activation.")}
    settings = settings or nested
    for name in STATISTICS:
        state.pop(name, None)
    unexpected = sorted(set(state) - set(WEIGHTS))
    if unexpected:
        raise SAEFormatError(f"{path}: entries {unexpected} are not an untied Autoencoder's")
    if not all(isinstance(state.get(name), torch.Tensor) for name in WEIGHTS):
        raise SAEFormatError(f"{path}: needs tensors {list(WEIGHTS)}; has {sorted(state)}")
    shapes = {name: tuple(t.shape) for name, t in state.items()}
    if len(shapes["encoder.weight"]) != 2:
        raise SAEFormatError(f"{path}: encoder.weight has shape {shapes['encoder.weight']}, expected 2-d")
    d_sae, d_in = shapes["encoder.weight"]
    expected = {"encoder.weight": (d_sae, d_in), "decoder.weight": (d_in, d_sae), "pre_bias": (d_in,)}
    check_shapes(path, shapes, expected | {"latent_bias": (d_sae,)})
    cfg = {
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": str(state["encoder.weight"].dtype).removeprefix("torch."),
        **_activation(path, activation, settings),
    }
    tensors = {
        "W_enc": state["encoder.weight"].T,
        "b_enc": state["latent_bias"],
        "W_dec": state["decoder.weight"].T,
        "b_dec": state["pre_bias"],
    }
    return cfg, tensors


def _activation(path: Path, activation: object, settings: object) -> dict[str, Any]:
    """The SAELens config entries for OpenAI's ``activation`` and its ``activation_state_dict``."""
    if activation == "ReLU":
        return {"architecture": "standard", "normalize_activations": "none"}
    if activation != "TopK":
        raise SAEFormatError(f"{path}: activation {activation!r} has no saex equivalent (supported: ReLU, TopK)")
    if not isinstance(settings, dict) or not isinstance(settings.get("k"), int) or settings["k"] <= 0:
        raise SAEFormatError(f"{path}: TopK without a positive integer k in activation_state_dict: {settings!r}")
    if settings.get("postact_fn", "ReLU") != "ReLU":
        raise SAEFormatError(
            f"{path}: TopK with postact_fn {settings['postact_fn']!r}: saex's topk keeps only positive values (ReLU)"
        )
    return {"architecture": "topk", "k": settings["k"], "normalize_activations": "layer_norm"}


def _hook(path: Path) -> str | None:
    """The hook in TransformerLens's words, from ``<location>/autoencoders/<layer>.pt``, or None elsewhere."""
    parent = path.parent
    match = _LOCATION.match(parent.parent.name)
    if parent.name != "autoencoders" or not path.stem.isdigit() or match is None:
        return None
    return f"blocks.{int(path.stem)}.{_TL_SITES[match.group(1)]}"
