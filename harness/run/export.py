"""Taking an SAE out of saex (``saex export``): the SAE of a finished cell (``original``, ``retrained``,
``finetuned:*``, ``pruned:*``, ``loaded:*``) written to a folder in SAELens's format (``cfg.json`` with the hook in
TransformerLens's words and the model's name, ``sae_weights.safetensors``: ``saex.sae.saelens.save_saelens``) or
saex's own (``saex.sae.base.save_sae``).

The cell is named by its key (or a unique prefix of it, as ``saex report`` prints it) or by a matrix and the cell's
fields (model, hook, sae, source, compression; those the matrix has one of may be left out). Its SAE is found the
way the runner finds it, through its artifacts and their content keys (``Runner.sae_artifact``), from a cache that
is only read: an artifact that is not there (the SAE, or the activations whose key is part of the SAE's) is an
``ExportError``, never computed. Nothing is written but the output folder, and an existing folder is replaced
only when asked (``force``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from saex.config.matrix import BASE, Cell, resolve_matrix
from saex.config.pretrained import SAE_LABEL
from saex.config.registry import Registry
from saex.config.sources import parse_source
from saex.model.hookpoints import parse_hook
from saex.plugin.manager import Plugins
from saex.run.runner import Runner
from saex.run.sae_artifacts import SAEArtifact
from saex.sae.base import save_sae
from saex.sae.saelens import save_saelens
from saex.storage.cache import Cache
from saex.storage.results import CellResult, ResultsStore

FORMATS = ("saelens", "saex")
FIELDS = ("model", "hook", "sae", "source", "compression")
MIN_KEY_PREFIX = 4


class ExportError(ValueError):
    """What stops an export, in one line: no such cell, several, not finished, its SAE not in the cache, a folder
    in the way."""


class NotCached(ExportError):
    """An artifact the cell's SAE needs is not in the cache (``ReadOnlyCache``)."""


class ReadOnlyCache(Cache):
    """The cache, only read: an artifact that is missing raises ``NotCached`` instead of being computed (every
    computation asks ``get`` first, so nothing runs before the error)."""

    def get(self, kind: str, key: str) -> Path | None:
        found = super().get(kind, key)
        if found is None:
            raise NotCached(f"{kind}/{key}")
        return found

    def put(self, kind: str, key: str, write: Callable[[Path], dict]) -> Path:
        raise NotCached(f"{kind}/{key}")


@dataclass
class Exported:
    """An SAE written by ``export_sae``: the folder, the format, the cell and the SAE's cache key."""

    path: Path
    format: str
    cell: Cell
    key: str  # the cell's key
    sae_key: str  # the SAE's cache key (for a loaded SAE, a hash of its files' identity)


def tl_hook(hook: str) -> str:
    """A saex hook point in TransformerLens's words (SAELens's ``hook_name``): ``layers.9.resid_post`` ->
    ``blocks.9.hook_resid_post``."""
    point = parse_hook(hook)
    return f"blocks.{point.layer}.hook_{point.site}"


def find_cell(
    registry: Registry,
    store: ResultsStore,
    *,
    matrix: str | None = None,
    key: str | None = None,
    fields: Mapping[str, str | None] | None = None,
) -> tuple[Cell, CellResult]:
    """The finished cell named by ``key`` (a full key or a unique prefix) or by ``matrix`` and ``fields`` (a value
    per field of ``FIELDS`` to match, None for any); its row. Cells that hold the same SAE (an ``original`` or
    ``loaded:`` SAE scored on M and on every M_c) count as one: the first finished one is taken."""
    fields = {name: value for name, value in (fields or {}).items() if value is not None}
    if key is not None:
        if fields:
            raise ExportError(f"--key names one cell: give it without {', '.join('--' + f for f in fields)}")
        return _by_key(registry, store, key, matrix)
    if matrix is None:
        raise ExportError("name the cell: --key KEY (saex report prints them), or --matrix and the cell's fields")
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise ExportError(f"unknown cell fields {unknown}; valid: {', '.join(FIELDS)}")
    cells = [c for c in resolve_matrix(registry, matrix).cells if all(_field(c, n) == v for n, v in fields.items())]
    if not cells:
        given = ", ".join(f"{n}={v}" for n, v in fields.items()) or "(none)"
        raise ExportError(f"matrix {matrix!r} has no cell with {given}")
    saes: dict[tuple, list[Cell]] = {}
    for cell in cells:
        saes.setdefault(_same_sae(cell), []).append(cell)
    if len(saes) > 1:
        listed = "; ".join(_sae_name(group[0]) for group in list(saes.values())[:6])
        more = f" and {len(saes) - 6} more" if len(saes) > 6 else ""
        raise ExportError(
            f"{len(saes)} SAEs of matrix {matrix!r} match: {listed}{more}; narrow with "
            f"{' '.join('--' + f for f in FIELDS if f not in fields)} or name one with --key"
        )
    (group,) = saes.values()
    rows = [(cell, store.get(cell.key(registry))) for cell in sorted(group, key=lambda c: c.scored_on != BASE)]
    for cell, row in rows:
        if row is not None and row.status == "done":
            return cell, row
    cell, row = rows[0]
    raise ExportError(f"cell {cell.label} is not finished ({row.status if row else 'no result yet'})")


def _field(cell: Cell, name: str) -> str | None:
    return getattr(cell, name)


def _sae_name(cell: Cell) -> str:
    on = "" if parse_source(cell.source).on_base_too else f" on {cell.compression}"
    return f"{cell.model} {cell.hook} {cell.sae}/{cell.source}{on}"


def _same_sae(cell: Cell) -> tuple:
    """What identifies a cell's SAE within a matrix: an SAE scored on M too is the same on every M_c."""
    base = (cell.model, cell.hook, cell.sae, cell.source)
    return base if parse_source(cell.source).on_base_too else (*base, cell.compression)


def _by_key(registry: Registry, store: ResultsStore, key: str, matrix: str | None) -> tuple[Cell, CellResult]:
    if len(key) < MIN_KEY_PREFIX:
        raise ExportError(f"--key {key!r}: give at least {MIN_KEY_PREFIX} characters of a cell's key")
    found = [r for r in store.rows(matrix) if r.key.startswith(key)]
    if not found:
        where = f" of matrix {matrix!r}" if matrix else ""
        raise ExportError(f"no cell{where} with key {key!r} in {store.path} (saex report MATRIX lists them)")
    if len(found) > 1:
        raise ExportError(f"key {key!r} is the start of {len(found)} cells' keys; give more of it")
    (row,) = found
    if row.status != "done":
        raise ExportError(f"cell {row.key} is not finished ({row.status})")
    values = {name: row.cell.get(name) for name in ("model", "compression", "hook", "sae", "source", "scored_on")}
    cell = Cell(matrix or row.cell.get("matrix") or row.matrix, **values)
    if cell.matrix not in registry.matrices:
        raise ExportError(f"cell {row.key} is of matrix {cell.matrix!r}, which the registry no longer has")
    if cell.key(registry) != row.key:
        raise ExportError(
            f"cell {row.key}: the registry's matrix {cell.matrix!r} no longer describes it (a component it used "
            "changed), so its SAE cannot be found"
        )
    return cell, row


def cell_sae(runner: Runner, cell: Cell, device: torch.device) -> SAEArtifact:
    """The SAE of ``cell`` found through ``runner``'s artifacts (``Runner.sae_artifact``): ``NotCached`` when an
    artifact it needs is missing from ``runner``'s cache and that cache is a ``ReadOnlyCache``."""
    session = runner.open_model(cell.matrix, cell.model, device)
    return runner.sae_artifact(cell, session.artifacts, session.target(cell, runner.registry), parse_hook(cell.hook))


def check_out(out: Path, force: bool) -> None:
    """Refuse an output folder that exists (unless ``force``) or is not a folder."""
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise ExportError(f"{out}: exists and is not a folder")
        if not force:
            raise ExportError(f"{out}: already exists; pass --force to overwrite the SAE files in it")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ExportError(f"{parent}: is not a folder (on the way to {out})")
            break


def export_sae(
    plugins: Plugins,
    registry: Registry,
    store: ResultsStore,
    cache_root: Path,
    out: Path,
    *,
    matrix: str | None = None,
    key: str | None = None,
    fields: Mapping[str, str | None] | None = None,
    format: str = "saelens",
    force: bool = False,
    device: torch.device | str = "cpu",
    log: Callable[[str], None] = lambda message: None,
) -> Exported:
    """Write the SAE of the cell ``find_cell`` names into ``out`` in ``format`` (module doc)."""
    if format not in FORMATS:
        raise ExportError(f"unknown format {format!r}; valid: {', '.join(FORMATS)}")
    out = Path(out)
    check_out(out, force)
    cell, row = find_cell(registry, store, matrix=matrix, key=key, fields=fields)
    runner = Runner(
        plugins, registry, ResultsStore(Path(":memory:")), ReadOnlyCache(cache_root), progress=False, log=log
    )
    try:
        artifact = cell_sae(runner, cell, torch.device(device))
    except NotCached as exc:
        raise ExportError(
            f"cell {row.key} ({cell.label}) is finished but its SAE is not in the cache {cache_root} "
            f"({exc} is missing); nothing was computed"
        ) from None
    sae = artifact.sae.cpu()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        if format == "saelens":
            save_saelens(sae, tmp, metadata=_metadata(cell, row))
        else:
            save_sae(sae, tmp)
        out.mkdir(exist_ok=True)
        for path in sorted(tmp.iterdir()):
            os.replace(path, out / path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Exported(out, format, cell, row.key, artifact.key)


def _metadata(cell: Cell, row: CellResult) -> dict:
    """SAELens's ``model_name`` and ``hook_name``, and where the SAE comes from (``saex_cell``)."""
    about = {**asdict(cell), "key": row.key}
    if isinstance(label := row.details.get(SAE_LABEL), str):
        about[SAE_LABEL] = label
    return {"model_name": cell.model, "hook_name": tl_hook(cell.hook), "saex_cell": about}
