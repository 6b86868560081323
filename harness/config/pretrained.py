"""``loaded:`` SAE sources resolved and checked while the registry is read, before anything runs: the file each
one names (a path, or an id of one of the registry's ``releases``), its format (named or detected), its width and
the hook it was trained on, which must be the matrix's.

A release is a local directory of pretrained SAEs named by id, like an entry of SAELens's
``pretrained_saes.yaml``, declared in the registry's ``releases`` section::

    releases:
      gemma-scope-2b-res:
        path: ~/sae/gemma-scope-2b-pt-res     # a relative path starts at the registry file's folder
        format: gemmascope                    # optional: its SAEs' format, else detected per SAE
        saes:
          layer_12: {path: layer_12/width_16k/average_l0_82}
          layer_20: {path: layer_20/width_16k/average_l0_71, hook: layers.20.resid_post}

and ``loaded:gemma-scope-2b-res/layer_12`` names one of its SAEs. The part before the first ``/`` is a release
when the registry declares one of that name; otherwise the source is a path (``./name/...`` always is), relative
to the working directory. An SAE's ``hook`` says which saex hook point it belongs to where its files do not say,
or say it in words saex does not map (sparsify's ``layers.L.mlp``); it may not contradict what the files say.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from saex.config.registry_file import RegistryError
from saex.config.sources import parse_source
from saex.model.hookpoints import parse_hook
from saex.sae.base import SAEFile, SAEFormatError
from saex.sae.formats import FORMAT_NAMES, describe

SAE_LABEL = "sae_label"  # the cell details' key naming the loaded SAE a cell's SAE is or derives from (its label)


def _known_format(format: str | None) -> str | None:
    if format is not None and format not in FORMAT_NAMES:
        raise ValueError(f"unknown SAE format {format!r}; valid: {', '.join(FORMAT_NAMES)}")
    return format


class ReleaseSAE(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="relative to the release's path")
    format: str | None = Field(None, description="the SAE's format; default the release's, else detected")
    hook: str | None = Field(None, description="saex hook point it was trained on, where its files do not say")
    description: str = ""

    _format = field_validator("format")(_known_format)

    @field_validator("hook")
    @classmethod
    def _hook_parses(cls, hook: str | None) -> str | None:
        if hook is not None:
            parse_hook(hook)
        return hook


class ReleaseEntry(BaseModel):
    """A directory of pretrained SAEs named by id (the registry's ``releases`` section)."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="the release's directory; a relative path starts at the registry file's folder")
    format: str | None = Field(None, description="its SAEs' format unless one names its own; else detected")
    description: str = ""
    saes: dict[str, ReleaseSAE] = Field(min_length=1, description="id -> SAE; the source is loaded:<release>/<id>")

    _format = field_validator("format")(_known_format)


@dataclass(frozen=True)
class LoadedRef:
    """A ``loaded:`` source resolved: the files, what they say (``file``), the saex hook it belongs to, and the
    release/id it was named by (None for a path)."""

    source: str  # as the matrix writes it
    path: Path
    file: SAEFile
    hook: str | None
    release_id: str | None = None  # "<release>/<id>" when named through the registry's ``releases``

    @property
    def label(self) -> str:
        """How the report, the site and the store's details name this SAE: its own identity, never the matrix's
        ``saes`` entry (``loaded_label``)."""
        return loaded_label(self.file.format, self.path, self.release_id)

    def identity(self) -> dict[str, Any]:
        """For cell keys: the format and the files (path, sizes, modification times): results of a replaced file
        are not taken for the new one's."""
        paths = sorted(p for p in self.path.iterdir() if p.is_file()) if self.path.is_dir() else [self.path]
        stamp = "|".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in paths)
        return {"format": self.file.format, "path": str(self.path), "files": hashlib.sha256(stamp.encode()).hexdigest()}


def resolve_loaded(
    text: str, releases: Mapping[str, ReleaseEntry], origins: Mapping[str, str], file: str, where: str
) -> LoadedRef:
    """The files the ``loaded:`` source ``text`` names (``where`` in ``file``: the matrix's place, for errors),
    read without loading the weights. A problem with a release's SAE is reported at its entry in the release."""
    source = parse_source(text)
    assert source.kind == "loaded" and source.path is not None
    name, _, sae_id = source.path.partition("/")
    hook, format = None, source.format
    if name in releases and not sae_id:
        raise RegistryError(file, where, f"names release {name!r} without an SAE id", text, sorted(releases[name].saes))
    if name in releases:
        release = releases[name]
        if sae_id not in release.saes:
            raise RegistryError(file, where, f"release {name!r} has no SAE of that id", sae_id, sorted(release.saes))
        entry = release.saes[sae_id]
        file, where = origins[f"releases.{name}"], f"releases.{name}.saes.{sae_id}"
        path = Path(file).parent / Path(release.path).expanduser() / Path(entry.path).expanduser()
        hook, format = entry.hook, format or entry.format or release.format
    else:
        path = Path(source.path).expanduser()
    try:
        found = describe(path, format)
    except SAEFormatError as exc:
        raise RegistryError(file, where, f"cannot read the SAE: {exc}", text) from None
    if hook and found.saex_hook and hook != found.saex_hook:
        message = f"contradicts the SAE's files, which say it was trained on {found.hook} ({found.saex_hook})"
        raise RegistryError(file, f"{where}.hook", message, hook)
    release_id = f"{name}/{sae_id}" if name in releases else None
    return LoadedRef(text, path.resolve(), found, hook or found.saex_hook, release_id)


def loaded_label(format: str, path: str | Path, release_id: str | None = None) -> str:
    """A loaded SAE's name: ``<format>:<release>/<id>`` for an SAE of a release, else ``<format>:`` and the name
    of its folder, or of its file with the folder it is in (``gemmascope:average_l0_82/params.npz``,
    ``openai:autoencoders/5.pt``, ``saelens:my-sae``)."""
    if release_id:
        return f"{format}:{release_id}"
    path = Path(path)
    is_file = path.is_file() or (not path.exists() and path.suffix in (".npz", ".pt", ".pth", ".safetensors"))
    name = f"{path.parent.name}/{path.name}" if is_file and path.parent.name else path.name
    return f"{format}:{name or path}"


def check_hooks(ref: LoadedRef, hooks: list[str], file: str, matrix: str, index: int) -> None:
    """A loaded SAE is scored only at the hook it was trained on: refuse ``matrices.<matrix>`` when one of its
    ``hooks`` is another, or when the files name a hook saex has no hook point for."""
    where = f"matrices.{matrix}.sources[{index}]"
    if ref.hook is None and ref.file.hook is not None:
        message = (
            f"the SAE was trained on {ref.file.hook!r}, which is no saex hook point; if it is one, say which "
            "with `hook:` in a release entry"
        )
        raise RegistryError(file, where, message, ref.source)
    for j, hook in enumerate(hooks):
        if ref.hook is not None and hook != ref.hook:
            trained_on = ref.hook if ref.file.hook in (None, ref.hook) else f"{ref.file.hook} ({ref.hook})"
            message = f"{ref.source} was trained on {trained_on}; a loaded SAE is scored only at its own hook"
            raise RegistryError(file, f"matrices.{matrix}.hooks[{j}]", message, hook, [ref.hook])
