"""EleutherAI's sparsify (github.com/EleutherAI/sparsify; ``SparseCoder``, alias ``Sae``): a folder per
hookpoint with ``cfg.json`` (``SparseCoderConfig`` fields plus ``d_in``) and ``sae.safetensors``, as
``SparseCoder.save_to_disk`` writes and ``load_from_disk`` reads it.

Tensors: ``encoder.weight [num_latents, d_in]`` and ``encoder.bias`` (an ``nn.Linear``), ``W_dec [num_latents,
d_in]`` (already saex's orientation: sparsify decodes with ``W_dec.mT.mT``) and ``b_dec [d_in]``. ``encode``
subtracts ``b_dec`` from the input, applies the encoder and a ReLU, and keeps the top ``k`` per token;
``decode`` sums the kept latents' ``W_dec`` rows and adds ``b_dec``: SAELens's ``topk`` with
``apply_b_dec_to_input``. num_latents is ``num_latents`` or ``d_in * expansion_factor``. It computes in the
file's dtype (``load_from_disk`` builds the module in its first tensor's dtype), so the SAE does too.
``normalize_decoder`` and ``multi_topk`` shape only training. Refused: ``activation = groupmax`` (one latent per
group is not a top-k), transcoders (``transcode``), a skip connection (``W_skip``) and ``signed`` latents.

(SAELens 6.54's ``sparsify`` loader differs from sparsify's own code in two places: it transposes ``W_dec`` and
sets ``apply_b_dec_to_input = not normalize_decoder``; saex follows sparsify's ``encode``/``decode``.)

The folder name is the hookpoint, a module name of the HF model: a decoder layer's output (``layers.L``, GPT-2's
``h.L``) is the residual stream after block L, saex's ``layers.L.resid_post``; other modules (``layers.L.mlp``,
...) sit before or after a norm depending on the model, so saex does not map them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from saex.plugin.protocols import SAEArchitecture
from saex.sae.base import CFG_FILE, SAE, SAEFile, SAEFormatError, check_tensor_shapes
from saex.sae.saelens import read_json, sae_from_saelens

FILES = "cfg.json + sae.safetensors"
WEIGHTS_FILE = "sae.safetensors"
_LAYER_OUTPUT = re.compile(r"^(?:model\.|transformer\.|gpt_neox\.)?(?:layers|h)\.(\d+)$")


def detect(path: Path) -> bool:
    return path.is_dir() and (path / CFG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def describe(path: Path) -> SAEFile:
    cfg = _cfg(path)
    match = _LAYER_OUTPUT.match(path.resolve().name)
    saex_hook = f"layers.{match.group(1)}.resid_post" if match else None
    return SAEFile("sparsify", path, cfg["d_in"], cfg["d_sae"], path.resolve().name, saex_hook)


def load(path: Path, architectures: Mapping[str, SAEArchitecture]) -> SAE:
    cfg = _cfg(path)
    state = load_file(str(path / WEIGHTS_FILE))
    tensors = {
        "W_enc": state["encoder.weight"].T,
        "b_enc": state["encoder.bias"],
        "W_dec": state["W_dec"],
        "b_dec": state["b_dec"],
    }
    dtype = str(state["encoder.weight"].dtype).removeprefix("torch.")
    return sae_from_saelens(cfg | {"dtype": dtype}, tensors, architectures, path / WEIGHTS_FILE)


def _cfg(path: Path) -> dict[str, Any]:
    """A SAELens config for the folder (without its dtype), after checking what saex cannot express and the
    weights' shapes against the config."""
    cfg_path = path / CFG_FILE
    raw = read_json(cfg_path)
    d_in = raw.get("d_in")
    if not isinstance(d_in, int) or d_in <= 0:
        raise SAEFormatError(f"{cfg_path}: d_in must be a positive integer, got {d_in!r}")
    k, d_sae = raw.get("k", 32), raw.get("num_latents") or d_in * raw.get("expansion_factor", 32)
    if not isinstance(k, int) or not isinstance(d_sae, int) or not 0 < k <= d_sae:
        raise SAEFormatError(f"{cfg_path}: needs integers 0 < k <= num_latents, got k={k!r}, num_latents={d_sae!r}")
    for key, allowed in (("activation", "topk"), ("transcode", False), ("skip_connection", False), ("signed", False)):
        if raw.get(key, allowed) != allowed:
            raise SAEFormatError(f"{cfg_path}: {key}={raw[key]!r} has no saex equivalent (supported: {allowed!r})")
    expected = {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    shapes = check_tensor_shapes(path / WEIGHTS_FILE, expected)
    if set(shapes) != set(expected):
        raise SAEFormatError(f"{path / WEIGHTS_FILE}: tensors {sorted(set(shapes) - set(expected))} are not supported")
    return {
        "architecture": "topk",
        "d_in": d_in,
        "d_sae": d_sae,
        "k": k,
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "metadata": {"hook_name": path.resolve().name},
    }
