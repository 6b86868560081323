"""SAELens's on-disk format both ways: ``cfg.json`` + ``sae_weights.safetensors`` as SAELens 6 writes them
(``SAE.save_model`` / ``TrainingSAE.save_inference_model``) and reads them (``SAE.load_from_disk``).

Architectures map as follows (SAELens -> saex; saving goes the other way):

| SAELens | saex | note |
|---|---|---|
| ``standard`` | ``relu`` | |
| ``topk`` | ``topk`` | ``rescale_acts_by_decoder_norm`` is folded into the weights on load |
| ``jumprelu`` | ``jumprelu`` | ``log_threshold`` of old files is exponentiated |
| ``jumprelu``, ``training_architecture: batchtopk``, one threshold | ``batchtopk`` | SAELens's BatchTopK save |
| ``batchtopk`` (a SAELens training checkpoint) | ``batchtopk`` | ``topk_threshold`` becomes the inference threshold |

Everything else that SAELens's inference ``encode`` does is folded into the four weight tensors, so our
``encode``/``decode`` give SAELens's results: ``apply_b_dec_to_input = false`` moves ``b_dec @ W_enc`` into
``b_enc``; our ``norm_scale`` s is folded on save (``W_enc * s``, ``W_dec / s``, ``b_dec / s``).
``normalize_activations = expected_average_only_in`` is a no-op in SAELens's inference classes (the factor is
meant to be folded already) and so here. Per-token normalisations (``constant_norm_rescale``, ``layer_norm``),
unfolded whitening and ``hook_z`` reshaping are refused with ``SAEFormatError``.

The runner's ``loaded:<path>`` SAE source calls ``load_pretrained``, which reads either format.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from saex import __version__
from saex.protocols import SAEArchitecture
from saex.sae import CFG_FILE, SAE, WEIGHTS_FILE, SAEFormatError, load_sae

SAELENS_FORMAT_VERSION = "6.0.0"  # written as metadata.sae_lens_version: SAELens reads the file as 6.x layout
SUPPORTED_NORMALIZATIONS = (None, "none", "expected_average_only_in")
WEIGHT_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")


def load_pretrained(directory: str | Path, architectures: Mapping[str, SAEArchitecture]) -> SAE:
    """An SAE saved by saex (``save_sae``) or by SAELens, whichever ``cfg.json`` says, on CPU."""
    cfg = _read_json(Path(directory) / CFG_FILE)
    if "saex_version" in cfg:
        return load_sae(directory, architectures)
    return load_saelens(directory, architectures)


# --- SAELens -> saex ---------------------------------------------------------------------------------------


def load_saelens(directory: str | Path, architectures: Mapping[str, SAEArchitecture]) -> SAE:
    """Read an SAE saved by SAELens into the saex architecture it corresponds to (table in the module doc),
    on CPU in the file's dtype, with ``norm_scale`` 1. Encode/decode agree with SAELens's inference SAE."""
    directory = Path(directory)
    cfg_path, weights_path = directory / CFG_FILE, directory / WEIGHTS_FILE
    cfg = _defaulted(_read_json(cfg_path))
    if not weights_path.is_file():
        raise SAEFormatError(f"{weights_path}: missing")
    state = {name: t.double() for name, t in load_file(str(weights_path)).items()}
    _check_supported(cfg, cfg_path)
    if "log_threshold" in state:
        state["threshold"] = state.pop("log_threshold").exp()
    scaling = state.pop("scaling_factor", None)
    if scaling is not None and not torch.all(scaling == 1):
        raise SAEFormatError(f"{weights_path}: a finetuning scaling_factor other than 1 is not supported")
    missing = [name for name in WEIGHT_NAMES if name not in state]
    if missing:
        raise SAEFormatError(f"{weights_path}: missing tensors {missing}; has {sorted(state)}")
    if not cfg.get("apply_b_dec_to_input", True):
        state["b_enc"] = state["b_enc"] + state["b_dec"] @ state["W_enc"]
    if cfg.get("rescale_acts_by_decoder_norm", False):
        norms = state["W_dec"].norm(dim=-1)
        state["W_enc"], state["b_enc"] = state["W_enc"] * norms, state["b_enc"] * norms
        state["W_dec"] = state["W_dec"] / norms[:, None]
    name, params, extra = _saex_equivalent(cfg, state, cfg_path)
    unexpected = sorted(set(state) - set(WEIGHT_NAMES) - set(extra))
    if unexpected:
        raise SAEFormatError(f"{weights_path}: unexpected tensors {unexpected} for {cfg['architecture']!r}")
    arch = architectures.get(name)
    if arch is None:
        raise SAEFormatError(f"{cfg_path}: needs the saex SAE architecture {name!r}, which is not registered")
    try:
        sae = arch.build(int(cfg["d_in"]), arch.Params.model_validate(params))
    except ValidationError as e:
        raise SAEFormatError(f"{cfg_path}: cannot express as saex {name!r} params: {e}") from e
    dtype = _dtype(cfg.get("dtype", "float32"), cfg_path)
    sae.to(dtype)
    own = sae.state_dict()
    for key, value in {**{k: state[k] for k in WEIGHT_NAMES}, **extra}.items():
        if own[key].shape != value.shape:
            raise SAEFormatError(
                f"{weights_path}: {key} has shape {tuple(value.shape)}, expected {tuple(own[key].shape)}"
            )
        own[key] = value.to(own[key].dtype)
    sae.load_state_dict(own, strict=True)
    return sae.eval()


def _saex_equivalent(
    cfg: dict[str, Any], state: dict[str, torch.Tensor], cfg_path: Path
) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    """(saex architecture name, its params, state entries beyond the four weights)."""
    arch, d_sae = cfg["architecture"], int(cfg["d_sae"])
    metadata = cfg.get("metadata") or {}
    base: dict[str, Any] = {"d_sae": d_sae, "normalize_input": False, "b_dec_init": "zero"}
    saved_by_saex = metadata.get("saex_architecture"), metadata.get("saex_params")
    if arch == "standard":
        return "relu", _params("relu", base, saved_by_saex), {}
    if arch == "topk":
        return "topk", _params("topk", base | {"k": int(cfg["k"])}, saved_by_saex), {}
    if arch == "batchtopk":
        if "topk_threshold" not in state:
            raise SAEFormatError(f"{cfg_path}: batchtopk checkpoint without a topk_threshold tensor")
        threshold = state.pop("topk_threshold").reshape(())
        return "batchtopk", _params("batchtopk", base | {"k": float(cfg["k"])}, saved_by_saex), {"threshold": threshold}
    if arch == "jumprelu":
        if "threshold" not in state:
            raise SAEFormatError(f"{cfg_path}: jumprelu SAE without a threshold tensor")
        threshold = state["threshold"]
        details = metadata.get("training_architecture_details") or {}
        if metadata.get("training_architecture") == "batchtopk" and bool((threshold == threshold[0]).all()):
            params = base | ({"k": float(details["k"])} if "k" in details else {})
            return "batchtopk", _params("batchtopk", params, saved_by_saex), {"threshold": threshold[0]}
        return "jumprelu", _params("jumprelu", base, saved_by_saex), {"threshold": threshold}
    raise SAEFormatError(
        f"{cfg_path}: SAELens architecture {arch!r} has no saex equivalent; supported: standard, topk, jumprelu, "
        "batchtopk"
    )


def _params(name: str, base: dict[str, Any], saved_by_saex: tuple[object, object]) -> dict[str, Any]:
    """A file written by ``save_saelens`` carries our params: keep them (sizes from the file win)."""
    architecture, params = saved_by_saex
    if architecture == name and isinstance(params, dict):
        return params | {"d_sae": base["d_sae"]}
    return base


def _defaulted(cfg: dict[str, Any]) -> dict[str, Any]:
    """SAELens < 6 configs: the renames and defaults of SAELens's ``handle_pre_6_0_config`` that matter here."""
    version = cfg.get("sae_lens_version") or (cfg.get("metadata") or {}).get("sae_lens_version")
    if version and int(str(version).split(".")[0]) >= 6:
        return cfg
    cfg = dict(cfg)
    if "activation_fn_str" in cfg:
        cfg.setdefault("activation_fn", cfg.pop("activation_fn_str"))
    cfg.setdefault("architecture", "standard")
    k = (cfg.get("activation_fn_kwargs") or {}).get("k")
    if cfg.get("activation_fn") == "topk" and k is not None:
        cfg["architecture"], cfg["k"] = "topk", k
    if isinstance(cfg.get("normalize_activations"), bool):
        cfg["normalize_activations"] = "expected_average_only_in" if cfg["normalize_activations"] else "none"
    return cfg


def _check_supported(cfg: dict[str, Any], cfg_path: Path) -> None:
    for key in ("architecture", "d_in", "d_sae"):
        if key not in cfg:
            raise SAEFormatError(f"{cfg_path}: missing key {key!r} (not a SAELens SAE config?)")
    if cfg.get("normalize_activations") not in SUPPORTED_NORMALIZATIONS:
        raise SAEFormatError(
            f"{cfg_path}: normalize_activations={cfg['normalize_activations']!r} is not supported "
            f"(supported: none, expected_average_only_in; fold it into the weights with SAELens first)"
        )
    if cfg.get("reshape_activations", "none") not in (None, "none"):
        raise SAEFormatError(f"{cfg_path}: reshape_activations={cfg['reshape_activations']!r} is not supported")


# --- saex -> SAELens ---------------------------------------------------------------------------------------


def save_saelens(sae: SAE, directory: str | Path, *, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``sae`` so that SAELens's ``SAE.load_from_disk(directory)`` loads an equivalent inference SAE
    (``norm_scale`` folded into the weights). ``metadata`` (e.g. ``model_name``, ``hook_name``) is merged into
    cfg.json's ``metadata``; our architecture and params are kept there too, so ``load_saelens`` restores them."""
    directory = Path(directory)
    s = sae.norm_scale.double()
    weights = {
        "W_enc": sae.W_enc.detach().double() * s,
        "b_enc": sae.b_enc.detach().double(),
        "W_dec": sae.W_dec.detach().double() / s,
        "b_dec": sae.b_dec.detach().double() / s,
    }
    meta: dict[str, Any] = {
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "saex_version": __version__,
        "saex_architecture": sae.architecture,
        "saex_params": sae.params.model_dump(mode="json"),
    }
    cfg: dict[str, Any] = {"d_in": sae.d_in, "d_sae": sae.d_sae}
    if sae.architecture == "relu":
        cfg["architecture"] = "standard"
    elif sae.architecture == "topk":
        cfg |= {"architecture": "topk", "k": int(sae.params.k), "rescale_acts_by_decoder_norm": False}
    elif sae.architecture == "jumprelu":
        cfg["architecture"] = "jumprelu"
        weights["threshold"] = sae.threshold.detach().double()
    elif sae.architecture == "batchtopk":
        cfg["architecture"] = "jumprelu"
        weights["threshold"] = sae.threshold.detach().double().expand(sae.d_sae).clone()
        meta |= {"training_architecture": "batchtopk", "training_architecture_details": {"k": sae.params.k}}
    else:
        raise SAEFormatError(f"SAE architecture {sae.architecture!r} has no SAELens equivalent")
    dtype = sae.W_dec.dtype
    cfg |= {
        "dtype": str(dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": meta | dict(metadata or {}),
    }
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(dtype).contiguous() for k, v in weights.items()}, str(directory / WEIGHTS_FILE))
    (directory / CFG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
    return directory


# --- helpers -----------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise SAEFormatError(f"{path}: missing (not an SAE directory?)") from e
    except json.JSONDecodeError as e:
        raise SAEFormatError(f"{path}: invalid JSON: {e}") from e
    if not isinstance(value, dict):
        raise SAEFormatError(f"{path}: expected a JSON object")
    return value


def _dtype(name: object, cfg_path: Path) -> torch.dtype:
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise SAEFormatError(f"{cfg_path}: unknown dtype {name!r}")
    return dtype
