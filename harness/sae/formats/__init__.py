"""The SAEs people already have, read from local files: every on-disk format ``loaded:`` accepts, detected from
the files or named (``loaded:<format>:<path>``). ``FORMATS`` holds one entry per format: how its files are
recognised, what they say about themselves without loading the weights (``describe``: width and hook, which the
registry checks against the matrix before anything runs), and how they load.

saex's and SAELens's own layouts are read by ``saex.sae.base`` and ``saex.sae.saelens``; every other format is a module
of this package that translates its files into SAELens's conventions, as SAELens's pretrained loaders do, and
hands them to ``saex.sae.saelens.sae_from_saelens``: which architecture reads a file is decided in one place, and
no format reader knows the architectures beyond SAELens's names for them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saex.plugin.protocols import SAEArchitecture
from saex.sae.base import CFG_FILE, SAE, WEIGHTS_FILE, SAEFile, SAEFormatError, describe_saex, load_sae
from saex.sae.formats import gemmascope, openai, sparsify
from saex.sae.saelens import describe_saelens, load_saelens, read_json


@dataclass(frozen=True)
class SAEFormat:
    name: str
    files: str  # what its files look like, for messages
    detect: Callable[[Path], bool]
    describe: Callable[[Path], SAEFile]
    load: Callable[[Path, Mapping[str, SAEArchitecture]], SAE]


def _saelens_layout(path: Path) -> dict[str, Any] | None:
    """cfg.json of a directory in the layout saex and SAELens share, else None."""
    if path.is_dir() and (path / CFG_FILE).is_file() and (path / WEIGHTS_FILE).is_file():
        return read_json(path / CFG_FILE)
    return None


def _is_saex(path: Path) -> bool:
    cfg = _saelens_layout(path)
    return cfg is not None and "saex_version" in cfg


def _is_saelens(path: Path) -> bool:
    cfg = _saelens_layout(path)
    return cfg is not None and "saex_version" not in cfg


FORMATS: dict[str, SAEFormat] = {
    f.name: f
    for f in (
        SAEFormat("saex", "cfg.json with saex_version + sae_weights.safetensors", _is_saex, describe_saex, load_sae),
        SAEFormat("saelens", "cfg.json + sae_weights.safetensors", _is_saelens, describe_saelens, load_saelens),
        SAEFormat("gemmascope", gemmascope.FILES, gemmascope.detect, gemmascope.describe, gemmascope.load),
        SAEFormat("openai", openai.FILES, openai.detect, openai.describe, openai.load),
        SAEFormat("sparsify", sparsify.FILES, sparsify.detect, sparsify.describe, sparsify.load),
    )
}
FORMAT_NAMES = tuple(FORMATS)


def detect_format(path: Path) -> str:
    """The format of the SAE at ``path`` (its files are distinct, so at most one format matches)."""
    if not path.exists():
        raise SAEFormatError(f"{path}: no such file or directory")
    for fmt in FORMATS.values():
        if fmt.detect(path):
            return fmt.name
    expected = "; ".join(f"{f.name}: {f.files}" for f in FORMATS.values())
    raise SAEFormatError(f"{path}: no SAE saex can read (expected {expected})")


def describe(path: Path, format: str | None = None) -> SAEFile:
    """What the SAE at ``path`` says about itself (width, hook), its weights' shapes checked, nothing loaded."""
    return FORMATS[format or detect_format(path)].describe(path)


def load_pretrained(path: str | Path, architectures: Mapping[str, SAEArchitecture], format: str | None = None) -> SAE:
    """The SAE at ``path``, in ``format`` or the detected one, on CPU in the dtype its format computes in."""
    path = Path(path).expanduser()
    return FORMATS[format or detect_format(path)].load(path, architectures)
