"""SAELens's on-disk format both ways: ``cfg.json`` + ``sae_weights.safetensors`` as SAELens 6 writes them
(``SAE.save_model`` / ``TrainingSAE.save_inference_model``) and reads them (``SAE.load_from_disk``).

This module does what is the same for every architecture; how an architecture maps onto SAELens lives with it
(``SAE.saelens_architectures``, ``from_saelens``, ``to_saelens``; the built-ins' table is in docs/SAE.md), so
a new architecture is imported and exported without an edit here.

Loading folds into the four weight tensors what SAELens's inference ``encode`` does beyond them, so our
``encode``/``decode`` give SAELens's results: ``apply_b_dec_to_input = false`` moves ``b_dec @ W_enc`` into
``b_enc``; ``rescale_acts_by_decoder_norm`` scales W_enc's columns and b_enc by ||W_dec_j|| and W_dec's rows to
unit norm; an old file's ``log_threshold`` is exponentiated to ``threshold``.
``normalize_activations = expected_average_only_in`` is a no-op in SAELens's inference classes (the factor is
meant to be folded already) and so here; ``layer_norm`` (OpenAI's per-token norm) sets the SAE's ``layer_norm``.
``constant_norm_rescale``, unfolded whitening, ``hook_z`` reshaping and a finetuning ``scaling_factor`` other
than 1 are refused with ``SAEFormatError``. The SAE computes in the file's ``dtype``, as SAELens does (the dtype
convention is in ``saex.sae.base``); the folding runs in float64 before the one cast to it. The file then goes to the
registered architectures that list its SAELens ``architecture``: first the one that saved it
(``metadata.saex_architecture``), then the one it was trained as (``metadata.training_architecture``: SAELens
saves a BatchTopK as ``jumprelu``), then the rest by name; the first whose ``from_saelens`` reads it builds the
SAE. A file written by ``save_saelens`` keeps our params.

``sae_from_saelens`` does the same for a config and tensors in SAELens's conventions that came from elsewhere:
the readers of other formats (``saex.sae.formats``) translate their files as SAELens's pretrained loaders do and
hand them over, so every format maps onto the architectures the same way.

Saving folds our ``norm_scale`` s into the weights (``W_enc * s``, ``W_dec / s``, ``b_dec / s``; thresholds
stay, latents live in the scaled space) and adds the architecture's ``to_saelens`` fields and tensors.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from saex._version import __version__
from saex.plugin.protocols import SAEArchitecture
from saex.sae.base import (
    CFG_FILE,
    SAE,
    WEIGHTS_FILE,
    SAEFile,
    SAEFormatError,
    SAELensImport,
    check_shapes,
    check_tensor_shapes,
    weight_shapes,
)

SAELENS_FORMAT_VERSION = "6.0.0"  # written as metadata.sae_lens_version: SAELens reads the file as 6.x layout
SUPPORTED_NORMALIZATIONS = (None, "none", "expected_average_only_in", "layer_norm")
WEIGHT_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")
_TL_HOOK = re.compile(r"^blocks\.(\d+)\.hook_(resid_pre|resid_post|mlp_out|attn_out)$")
_SAEX_HOOK = re.compile(r"^layers\.\d+\.(resid_pre|resid_post|mlp_out|attn_out)$")


# --- SAELens -> saex ---------------------------------------------------------------------------------------


def load_saelens(directory: str | Path, architectures: Mapping[str, SAEArchitecture]) -> SAE:
    """Read an SAE saved by SAELens into the saex architecture that reads it (see the module doc), on CPU in
    the file's dtype, with ``norm_scale`` 1. Encode/decode agree with SAELens's inference SAE."""
    directory = Path(directory)
    cfg_path, weights_path = directory / CFG_FILE, directory / WEIGHTS_FILE
    cfg = _saelens_cfg(cfg_path)
    check_tensor_shapes(weights_path, weight_shapes(int(cfg["d_in"]), int(cfg["d_sae"])))
    return sae_from_saelens(cfg, load_file(str(weights_path)), architectures, weights_path)


def sae_from_saelens(
    cfg: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    architectures: Mapping[str, SAEArchitecture],
    path: Path,
) -> SAE:
    """The SAE that a SAELens 6 ``cfg`` (cfg.json as a dict) and ``tensors`` (its state dict) describe, read as the
    module doc says; ``path`` (the file they came from) names it in errors. On CPU, in ``cfg["dtype"]``."""
    cfg = dict(cfg)
    _check_supported(cfg, path)
    check_shapes(path, {k: tuple(t.shape) for k, t in tensors.items()}, weight_shapes(cfg["d_in"], cfg["d_sae"]))
    extra = {name: t.double() for name, t in tensors.items()}
    weights = _folded_weights(cfg, extra, path)
    arch, read, left = _read_as(cfg, extra, architectures, path)
    if left:
        raise SAEFormatError(f"{path}: unexpected tensors {sorted(left)} for {cfg['architecture']!r}")
    try:
        sae = arch.build(int(cfg["d_in"]), arch.Params.model_validate(_params(arch.name, read, cfg)))
    except ValidationError as e:
        raise SAEFormatError(f"{path}: cannot express as saex {arch.name!r} params: {e}") from e
    sae.to(_dtype(cfg.get("dtype", "float32"), path))
    own = sae.state_dict()
    for key, value in (weights | read.state).items():
        if own[key].shape != value.shape:
            raise SAEFormatError(f"{path}: {key} has shape {tuple(value.shape)}, expected {tuple(own[key].shape)}")
        own[key] = value.to(own[key].dtype)
    own["layer_norm"] = torch.tensor(cfg.get("normalize_activations") == "layer_norm")
    sae.load_state_dict(own, strict=True)
    return sae.eval()


def describe_saelens(directory: Path) -> SAEFile:
    """A SAELens SAE's width and hook (``metadata.hook_name``, top-level before SAELens 6), its weights' shapes
    checked against the config."""
    cfg = _saelens_cfg(directory / CFG_FILE)
    d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    check_tensor_shapes(directory / WEIGHTS_FILE, weight_shapes(d_in, d_sae))
    metadata = cfg.get("metadata") or {}
    hook = metadata.get("hook_name", cfg.get("hook_name"))
    head = metadata.get("hook_head_index", cfg.get("hook_head_index"))
    if hook is not None and head is not None:
        hook = f"{hook} (head {head})"
    return SAEFile("saelens", directory, d_in, d_sae, hook, saex_hook(hook))


def saex_hook(name: str | None) -> str | None:
    """The saex hook point a TransformerLens hook name (SAELens's ``hook_name``) means: ``blocks.6.hook_resid_post``
    -> ``layers.6.resid_post`` (likewise resid_pre, mlp_out, attn_out); a saex name stays itself. None for any
    other (``hook_z``, ``hook_resid_mid``, ``mlp.hook_post``, ``hook_embed``, a single head): saex has no hook
    point that is it."""
    if name is None:
        return None
    if _SAEX_HOOK.match(name):
        return name
    match = _TL_HOOK.match(name)
    return f"layers.{match.group(1)}.{match.group(2)}" if match else None


def _folded_weights(
    cfg: dict[str, Any], tensors: dict[str, torch.Tensor], weights_path: Path
) -> dict[str, torch.Tensor]:
    """Pop the four weights from ``tensors`` with SAELens's per-file conventions folded in (module doc); what
    stays in ``tensors`` is the architecture's, with ``log_threshold`` turned into ``threshold``."""
    if "log_threshold" in tensors:
        tensors["threshold"] = tensors.pop("log_threshold").exp()
    scaling = tensors.pop("scaling_factor", None)
    if scaling is not None and not torch.all(scaling == 1):
        raise SAEFormatError(f"{weights_path}: a finetuning scaling_factor other than 1 is not supported")
    missing = [name for name in WEIGHT_NAMES if name not in tensors]
    if missing:
        raise SAEFormatError(f"{weights_path}: missing tensors {missing}; has {sorted(tensors)}")
    w = {name: tensors.pop(name) for name in WEIGHT_NAMES}
    if not cfg.get("apply_b_dec_to_input", True):
        w["b_enc"] = w["b_enc"] + w["b_dec"] @ w["W_enc"]
    if cfg.get("rescale_acts_by_decoder_norm", False):
        norms = w["W_dec"].norm(dim=-1)
        w["W_enc"], w["b_enc"], w["W_dec"] = w["W_enc"] * norms, w["b_enc"] * norms, w["W_dec"] / norms[:, None]
    return w


def _read_as(
    cfg: dict[str, Any], extra: dict[str, torch.Tensor], architectures: Mapping[str, SAEArchitecture], cfg_path: Path
) -> tuple[SAEArchitecture, SAELensImport, dict[str, torch.Tensor]]:
    """(the architecture that reads the file, its reading, the tensors of ``extra`` it left), asking the readers
    of the file's SAELens architecture in the order of the module doc."""
    lens_arch = cfg["architecture"]
    readers = [a for a in architectures.values() if lens_arch in a.saelens_architectures]
    if not readers:
        supported = dict.fromkeys(n for a in architectures.values() for n in a.saelens_architectures)
        raise SAEFormatError(
            f"{cfg_path}: SAELens architecture {lens_arch!r} has no saex equivalent; supported: {', '.join(supported)}"
        )
    metadata = cfg.get("metadata") or {}
    preferred = [metadata.get("saex_architecture"), metadata.get("training_architecture")]
    readers.sort(key=lambda a: (preferred.index(a.name) if a.name in preferred else len(preferred), a.name))
    for arch in readers:
        left = dict(extra)
        try:
            read = arch.from_saelens(cfg, left)
        except SAEFormatError as e:
            raise SAEFormatError(f"{cfg_path}: {e}") from e
        if read is not None:
            return arch, read, left
    names = ", ".join(a.name for a in readers)
    raise SAEFormatError(f"{cfg_path}: no saex architecture ({names}) reads this SAELens {lens_arch!r} file")


def _params(name: str, read: SAELensImport, cfg: dict[str, Any]) -> dict[str, Any]:
    """A file written by ``save_saelens`` as ``name`` carries our params: keep them (the width from the file)."""
    metadata = cfg.get("metadata") or {}
    saved = metadata.get("saex_params")
    if metadata.get("saex_architecture") == name and isinstance(saved, dict):
        return saved | {"d_sae": int(cfg["d_sae"])}
    return read.params


def _saelens_cfg(cfg_path: Path) -> dict[str, Any]:
    cfg = _defaulted(read_json(cfg_path))
    for key in ("architecture", "d_in", "d_sae"):
        if key not in cfg:
            raise SAEFormatError(f"{cfg_path}: missing key {key!r} (not a SAELens SAE config?)")
    for key in ("d_in", "d_sae"):
        if not isinstance(cfg[key], int) or cfg[key] <= 0:
            raise SAEFormatError(f"{cfg_path}: {key} must be a positive integer, got {cfg[key]!r}")
    return cfg


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
    if cfg.get("normalize_activations") not in SUPPORTED_NORMALIZATIONS:
        raise SAEFormatError(
            f"{cfg_path}: normalize_activations={cfg['normalize_activations']!r} is not supported "
            f"(supported: none, expected_average_only_in, layer_norm; fold it into the weights with SAELens first)"
        )
    if cfg.get("reshape_activations", "none") not in (None, "none"):
        raise SAEFormatError(f"{cfg_path}: reshape_activations={cfg['reshape_activations']!r} is not supported")


# --- saex -> SAELens ---------------------------------------------------------------------------------------


def save_saelens(sae: SAE, directory: str | Path, *, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``sae`` so that SAELens's ``SAE.load_from_disk(directory)`` loads an equivalent inference SAE
    (``norm_scale`` folded into the weights). ``metadata`` (e.g. ``model_name``, ``hook_name``) is merged into
    cfg.json's ``metadata``; our architecture and params are kept there too, so ``load_saelens`` restores them."""
    directory = Path(directory)
    form = sae.to_saelens()
    s = sae.norm_scale.double()
    tensors = {
        "W_enc": sae.W_enc.detach().double() * s,
        "b_enc": sae.b_enc.detach(),
        "W_dec": sae.W_dec.detach().double() / s,
        "b_dec": sae.b_dec.detach().double() / s,
    } | form.tensors
    meta: dict[str, Any] = {
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "saex_version": __version__,
        "saex_architecture": sae.name,
        "saex_params": sae.params.model_dump(mode="json"),
    }
    dtype = sae.W_dec.dtype
    cfg: dict[str, Any] = {
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        **form.cfg,
        "dtype": str(dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "layer_norm" if sae.layer_norm else "none",
        "reshape_activations": "none",
        "metadata": meta | form.metadata | dict(metadata or {}),
    }
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to(dtype).contiguous() for k, v in tensors.items()}, str(directory / WEIGHTS_FILE))
    (directory / CFG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
    return directory


# --- helpers -----------------------------------------------------------------------------------------------


def read_json(path: Path) -> dict[str, Any]:
    """A config file's JSON object; every problem is an ``SAEFormatError`` naming the file."""
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
