"""Gemma Scope (Lieberum et al. 2024; the hub's ``google/gemma-scope-*`` repos): JumpReLU SAEs for Gemma 2, one
``params.npz`` per SAE with ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc``, ``b_dec`` and
``threshold``, laid out as ``<repo>/layer_<L>/width_<W>/average_l0_<N>/params.npz``.

Their encoder does not subtract ``b_dec`` (the Gemma Scope tutorial: pre = x W_enc + b_enc, f = ReLU(pre) *
[pre > threshold], x_hat = f W_dec + b_dec), so the file goes to the SAELens reader as SAELens's ``gemma_2``
loader hands it on: a ``jumprelu`` with ``apply_b_dec_to_input = false``, in float32. The file names no hook; it
is read from the path the hub gives it: the repo name (``...-res``, ``-mlp``, ``-att``, optionally
``-canonical``) and the ``layer_<L>`` folder, in SAELens's words (``blocks.L.hook_resid_post``, ``hook_mlp_out``,
``attn.hook_z``; saex has no hook for ``hook_z``). Arrays are read with ``allow_pickle=False``, and each one's
shape is checked from its header before any is loaded.
"""

from __future__ import annotations

import math
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from saex.plugin.protocols import SAEArchitecture
from saex.sae.base import SAE, SAEFile, SAEFormatError, check_shapes, weight_shapes
from saex.sae.saelens import sae_from_saelens, saex_hook

FILES = "params.npz (W_enc, W_dec, b_enc, b_dec, threshold)"
NPZ = "params.npz"
_REPO = re.compile(r"gemma-scope-.*-(res|mlp|att)(-canonical)?$")
_LAYER = re.compile(r"^layer_(\d+)$")
_SITES = {"res": "hook_resid_post", "mlp": "hook_mlp_out", "att": "attn.hook_z"}


def detect(path: Path) -> bool:
    return (path / NPZ).is_file() if path.is_dir() else path.suffix == ".npz"


def describe(path: Path) -> SAEFile:
    file = _npz(path)
    d_in, d_sae = _checked_shapes(file)
    hook = _hook(file)
    return SAEFile("gemmascope", path, d_in, d_sae, hook, saex_hook(hook))


def load(path: Path, architectures: Mapping[str, SAEArchitecture]) -> SAE:
    file = _npz(path)
    d_in, d_sae = _checked_shapes(file)
    with np.load(file, allow_pickle=False) as data:
        tensors = {_name(key): torch.from_numpy(data[key]) for key in data.files}
    cfg = {
        "architecture": "jumprelu",
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": "float32",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "metadata": {"hook_name": _hook(file)},
    }
    return sae_from_saelens(cfg, tensors, architectures, file)


def _npz(path: Path) -> Path:
    file = path / NPZ if path.is_dir() else path
    if not file.is_file():
        raise SAEFormatError(f"{file}: missing")
    return file


def _name(key: str) -> str:
    """Older releases spell the weights ``w_enc`` / ``w_dec`` (as SAELens's loader allows)."""
    return "W_" + key[2:] if key.startswith("w_") else key


def _checked_shapes(file: Path) -> tuple[int, int]:
    """(d_in, d_sae), with every array's shape and dtype read from its header and checked before any is loaded."""
    shapes = _array_shapes(file)
    if "W_enc" not in shapes or len(shapes["W_enc"]) != 2:
        raise SAEFormatError(f"{file}: no 2-d W_enc array; has {sorted(shapes)}")
    d_in, d_sae = shapes["W_enc"]
    check_shapes(file, shapes, weight_shapes(d_in, d_sae) | {"threshold": (d_sae,)})
    return d_in, d_sae


def _array_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Each array's shape from its .npy header; an array of objects, or one whose data is not exactly the size
    its header declares, is refused (so loading allocates only what the file holds)."""
    headers = {}
    try:
        with zipfile.ZipFile(file) as archive:
            for info in archive.infolist():
                with archive.open(info) as stream:
                    version = np.lib.format.read_magic(stream)
                    fmt = np.lib.format
                    read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
                    shape, _, dtype = read(stream)
                    headers[_name(info.filename.removesuffix(".npy"))] = (shape, dtype, info.file_size - stream.tell())
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise SAEFormatError(f"{file}: not a readable .npz archive: {e}") from e
    for name, (shape, dtype, data_bytes) in headers.items():
        if dtype.hasobject or dtype.kind != "f":
            raise SAEFormatError(f"{file}: {name} holds {dtype}, not floating-point numbers")
        if data_bytes != math.prod(shape) * dtype.itemsize:
            raise SAEFormatError(f"{file}: {name} declares shape {shape} but holds {data_bytes} bytes")
    return {name: tuple(shape) for name, (shape, _, _) in headers.items()}


def _hook(file: Path) -> str | None:
    """The hook in SAELens's words, from the hub's folder names in the path, or None when they are not there."""
    parts = file.resolve().parts
    layer = next((int(m.group(1)) for p in reversed(parts) if (m := _LAYER.match(p))), None)
    site = next((_SITES[m.group(1)] for p in reversed(parts) if (m := _REPO.search(p))), None)
    if layer is None or site is None:
        return None
    return f"blocks.{layer}.{site}"
