"""registry.yaml, validated with pydantic: named components with params, and named matrices.

Every component entry is resolved once, while reading: its plugin is looked up and its params validated by
the plugin's ``Params`` (defaults filled in). The runner receives ``Resolved`` components and never goes back
to the registry for a plugin; cell and cache keys hash ``Resolved.identity()``, so a changed default
recomputes.

Several files are merged (the project's, ``--registry`` files, files contributed by plugins); a name
defined twice is an error naming both files. A ``saes`` entry with ``sweep`` stands for one entry per value
(``saex.config.sweeps``). Every error names the file, the YAML path, the bad value and
the valid choices, and is raised while reading, before anything runs.

Read for one matrix (``load_registry(..., matrix=name)``, as ``saex run`` and ``saex validate MATRIX`` do), only
the problems of the files as a whole, of that matrix and of the entries it uses are errors; the problems of
other matrices and of entries it does not use are the registry's ``warnings``.
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from saex.config.pretrained import LoadedRef, ReleaseEntry, check_hooks, resolve_loaded
from saex.config.registry_file import RegistryError, RegistryErrors, read_registry_file
from saex.config.sources import parse_source
from saex.config.sweeps import SWEEP, expand_sweeps
from saex.model.hookpoints import parse_hook
from saex.plugin.manager import Kind, Plugins
from saex.plugin.protocols import Component
from saex.sae.training import TrainingConfig

SECTIONS: dict[str, Kind] = {
    "models": "model",
    "corpora": "corpus",
    "labelled_sets": "labelled",
    "compressions": "compression",
    "saes": "sae",
    "pruners": "pruner",
    "metrics": "metric",
    "executors": "executor",
}
C = TypeVar("C", bound=Component)
DEVICE_PATTERN = r"^(auto|cpu|mps|cuda(:\d+)?)$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ComponentEntry(Strict):
    """One named component: which plugin, with which params (validated by the plugin's Params)."""

    plugin: str
    params: dict[str, Any] = Field(default_factory=dict)
    description: str = ""


class CompressionEntry(ComponentEntry):
    allow_mismatch: bool = Field(False, description="keep a compressed model that did not do what it promised")


class SAEEntry(ComponentEntry):
    training: TrainingConfig = Field(default_factory=TrainingConfig)


class Tokens(Strict):
    """Token budgets per split (counted before removing special tokens)."""

    train: int = Field(200_000, gt=0)
    calibration: int = Field(16_384, gt=0)
    eval: int = Field(32_768, gt=0)


class MatrixEntry(Strict):
    description: str = ""
    models: list[str]
    corpus: str
    compressions: list[str]
    hooks: list[str]
    saes: list[str]
    sources: list[str] = Field(default_factory=lambda: ["original", "retrained"])
    metrics: list[str]
    tokens: Tokens = Field(default_factory=Tokens)
    block_size: int = Field(128, ge=8)
    seed: int = 0
    device: str = Field("auto", pattern=DEVICE_PATTERN, description="auto, cpu, cuda, cuda:<index> or mps")
    precision: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="dtype of the model passes (collection, model loss, splicing); compression runs in float32, "
        "SAEs compute in their own dtype (docs/PERFORMANCE.md: the deviation bfloat16 causes)",
    )

    @field_validator("models", "compressions", "hooks", "saes", "sources", "metrics")
    @classmethod
    def _no_repeats(cls, names: list[str]) -> list[str]:
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"listed more than once: {', '.join(repeated)}")
        return names

    @field_validator("hooks")
    @classmethod
    def _hooks_parse(cls, hooks: list[str]) -> list[str]:
        for hook in hooks:
            parse_hook(hook)
        return hooks

    @field_validator("sources")
    @classmethod
    def _sources_known(cls, sources: list[str]) -> list[str]:
        for source in sources:
            parse_source(source)
        return sources


@dataclass(frozen=True)
class Resolved(Generic[C]):
    """One registry entry resolved: its plugin component and validated params (defaults filled in)."""

    section: str
    name: str
    component: C
    params: BaseModel
    entry: ComponentEntry

    def identity(self) -> dict[str, Any]:
        """What determines this component's results, for cell and cache keys: the plugin, every param with
        defaults filled in, and the entry's own settings (``training``, ``allow_mismatch``); never its
        description or its name in the registry."""
        settings = self.entry.model_dump(mode="json", exclude={"plugin", "params", "description"})
        return {"plugin": self.entry.plugin, "params": self.params.model_dump(mode="json"), **settings}


class Registry(BaseModel):
    """The merged registry. ``origins`` maps "section.name" to the file that defined it."""

    models: dict[str, ComponentEntry] = Field(default_factory=dict)
    corpora: dict[str, ComponentEntry] = Field(default_factory=dict)
    labelled_sets: dict[str, ComponentEntry] = Field(default_factory=dict)
    compressions: dict[str, CompressionEntry] = Field(default_factory=dict)
    saes: dict[str, SAEEntry] = Field(default_factory=dict)
    pruners: dict[str, ComponentEntry] = Field(default_factory=dict)
    metrics: dict[str, ComponentEntry] = Field(default_factory=dict)
    executors: dict[str, ComponentEntry] = Field(default_factory=dict)
    matrices: dict[str, MatrixEntry] = Field(default_factory=dict)
    releases: dict[str, ReleaseEntry] = Field(default_factory=dict)
    origins: dict[str, str] = Field(default_factory=dict)
    _resolved: dict[tuple[str, str], Resolved] = PrivateAttr(default_factory=dict)
    _files: list[Path] = PrivateAttr(default_factory=list)  # as given to load_registry (no plugin files)
    _loaded: dict[str, LoadedRef] = PrivateAttr(default_factory=dict)  # loaded: sources, resolved
    # problems of single entries, by "section.name" (a broken entry is left out of its section), and the
    # entries each matrix uses ("section.name"): what ``problems(matrix)`` reports for a matrix
    _problems: list[tuple[str, RegistryError]] = PrivateAttr(default_factory=list)
    _uses: dict[str, set[str]] = PrivateAttr(default_factory=dict)
    _warnings: list[RegistryError] = PrivateAttr(default_factory=list)

    @property
    def files(self) -> list[Path]:
        """The files this registry was read from (plugins' files are added again by ``load_registry``), so
        another process can rebuild the same registry."""
        return list(self._files)

    @property
    def warnings(self) -> list[RegistryError]:
        """The problems ``load_registry(..., matrix=name)`` found outside that matrix and what it uses."""
        return list(self._warnings)

    def problems(self, matrix: str | None = None) -> list[RegistryError]:
        """Every problem found while reading (None), or those of one matrix: its own entry's and those of the
        entries it uses (models, corpus, compressions, saes, metrics, pruners, releases)."""
        if matrix is None:
            return [error for _, error in self._problems]
        concern = {f"matrices.{matrix}", *self._uses.get(matrix, ())}
        return [error for where, error in self._problems if where in concern]

    def matrix(self, name: str) -> MatrixEntry:
        """A matrix whose entry and components are valid; one that is broken raises its problems."""
        _raise_all(self.problems(name))
        if name not in self.matrices:
            files = sorted(set(self.origins.values()))
            raise RegistryError(", ".join(files), "matrices", "no such matrix", name, sorted(self.matrices))
        return self.matrices[name]

    def component(self, section: str, name: str) -> Resolved:
        """Entry ``section.name`` resolved by ``load_registry`` (plugin component + validated params); a broken
        entry raises its problems."""
        if (section, name) not in self._resolved:
            _raise_all([error for where, error in self._problems if where == f"{section}.{name}"])
        return self._resolved[(section, name)]

    def loaded_sae(self, matrix: str, source: str) -> LoadedRef | None:
        """The files a cell of ``source`` in ``matrix`` uses: its own for ``loaded:``; for ``retrained``,
        ``finetuned:`` and ``pruned:``, the matrix's ``loaded:`` source, which takes the place of ``original``
        (``saex.run.artifacts``); None when the SAE comes from training."""
        kind = parse_source(source).kind
        if kind == "loaded":
            return self._loaded[source]
        if kind == "original":
            return None
        loaded = [s for s in self.matrix(matrix).sources if s.startswith("loaded:")]
        return self._loaded[loaded[0]] if loaded else None

    def matrix_components(self, name: str, section: str) -> list[Resolved]:
        """The resolved entries a matrix names in ``section`` (``models``, ``compressions``, ``saes``,
        ``metrics``), in the matrix's order."""
        return [self.component(section, n) for n in getattr(self.matrix(name), section)]


def _format_loc(prefix: str, loc: tuple[Any, ...]) -> str:
    path = prefix
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def _merge_file(merged: dict[str, dict[str, Any]], origins: dict[str, str], file: Path) -> None:
    data = read_registry_file(file)
    allowed = list(SECTIONS) + ["matrices", "releases"]
    for section, entries in data.items():
        if section not in allowed:
            raise RegistryError(file, section, "unknown section", section, allowed)
        if not isinstance(entries, dict):
            raise RegistryError(file, section, "must be a mapping of name -> entry", type(entries).__name__)
        for name, entry in entries.items():
            key = f"{section}.{name}"
            if key in origins:
                raise RegistryError(file, key, f"defined twice: also in {origins[key]}")
            origins[key] = str(file)
            merged.setdefault(section, {})[name] = entry


def _validate_entries(
    merged: dict[str, dict[str, Any]], origins: dict[str, str], found: list[tuple[str, RegistryError]]
) -> Registry:
    """Every entry validated by its section's model; an entry that is not valid is left out, its problems
    recorded (with those ``found`` before) under its "section.name"."""
    models = {"saes": SAEEntry, "matrices": MatrixEntry, "compressions": CompressionEntry, "releases": ReleaseEntry}
    validated: dict[str, dict[str, BaseModel]] = {}
    for section, entries in merged.items():
        model = models.get(section, ComponentEntry)
        validated[section] = {}
        for name, raw in entries.items():
            try:
                validated[section][name] = model.model_validate(raw)
            except ValidationError as exc:
                where = f"{section}.{name}"
                found += [(where, error) for error in _validation_errors(exc, origins[where], where, model)]
    reg = Registry(**validated, origins=origins)
    reg._problems = found
    return reg


def _resolve_components(reg: Registry, plugins: Plugins) -> None:
    """Look up every entry's plugin and validate its params, once; the results are ``reg.component``, the
    problems are recorded under the entry's "section.name"."""
    for section, kind in SECTIONS.items():
        for name, entry in getattr(reg, section).items():
            where = f"{section}.{name}"
            file = reg.origins[where]
            if entry.plugin not in plugins.names(kind):
                message = f"no {kind} plugin of that name"
                error = RegistryError(file, f"{where}.plugin", message, entry.plugin, plugins.names(kind))
                reg._problems.append((where, error))
                continue
            component = plugins.get(kind, entry.plugin)
            try:
                params = component.Params(**entry.params)
            except ValidationError as exc:
                reg._problems += [
                    (where, e) for e in _validation_errors(exc, file, f"{where}.params", component.Params)
                ]
                continue
            reg._resolved[(section, name)] = Resolved(section, name, component, params, entry)


def _validation_errors(exc: ValidationError, file: str, where: str, model: type[BaseModel]) -> list[RegistryError]:
    """Every problem pydantic found in one entry, unknown keys first: a misspelt key is named as such, with the
    closest valid name (its required twin is then also reported missing)."""
    errors = sorted(exc.errors(), key=lambda err: err["type"] != "extra_forbidden")
    found = []
    for err in errors:
        loc = _format_loc(where, err["loc"])
        if err["type"] == "extra_forbidden":
            fields = list(_fields_at(model, err["loc"][:-1]))
            close = difflib.get_close_matches(str(err["loc"][-1]), fields, n=1, cutoff=0.6)
            message = f"unknown key{f', did you mean {close[0]!r}?' if close else ''}"
            found.append(RegistryError(file, loc, message, err.get("input"), fields or None))
        else:
            value = err.get("input") if err["type"] != "missing" else None
            found.append(RegistryError(file, loc, err["msg"], value if not isinstance(value, dict) else None))
    return found


def _fields_at(model: type[BaseModel], loc: tuple) -> dict[str, object]:
    """The fields of the model found at ``loc`` inside ``model`` (empty where it is not a pydantic model)."""
    for part in loc:
        field = model.model_fields.get(str(part)) if isinstance(part, str) else None
        inner = getattr(field, "annotation", None) if field else None
        if not (isinstance(inner, type) and issubclass(inner, BaseModel)):
            return {}
        model = inner
    return model.model_fields


def _raise_all(found: list[RegistryError]) -> None:
    if len(found) == 1:
        raise found[0]
    if found:
        raise RegistryErrors(found)


def _labelled_sets_of(reg: Registry, metric: str) -> list[str]:
    """The ``labelled_sets`` entries a resolved metric entry reads (its params' ``labelled_sets``)."""
    resolved = reg._resolved.get(("metrics", metric))
    return list(getattr(resolved.params, "labelled_sets", ())) if resolved is not None else []


def _check_labelled_sets(reg: Registry) -> None:
    """A metric whose params name a labelled set nobody defined is a problem of that metric's entry."""
    broken = {where for where, _ in reg._problems}  # a broken set is defined: its problems are its own
    for metric in reg.metrics:
        for i, name in enumerate(_labelled_sets_of(reg, metric)):
            if name not in reg.labelled_sets and f"labelled_sets.{name}" not in broken:
                where = f"metrics.{metric}"
                error = RegistryError(
                    reg.origins[where],
                    f"{where}.params.labelled_sets[{i}]",
                    "not defined in labelled_sets",
                    name,
                    sorted(reg.labelled_sets),
                )
                reg._problems.append((where, error))


def _check_matrices(reg: Registry) -> None:
    """Every matrix's references and sources, each matrix on its own: a matrix that names an entry nobody
    defined, or whose sources do not hold together, is left out of ``reg.matrices`` with its problems recorded
    under "matrices.<name>"; the entries it names (broken ones too, whose problems are their own) are what it
    uses."""
    broken = {where for where, _ in reg._problems}
    for name, matrix in list(reg.matrices.items()):
        file = reg.origins[f"matrices.{name}"]
        uses = reg._uses[name] = set()
        found: list[RegistryError] = []
        for section, place, ref, message in _references(matrix):
            if ref in getattr(reg, section) or f"{section}.{ref}" in broken:
                uses.add(f"{section}.{ref}")
            else:
                found.append(
                    RegistryError(file, f"matrices.{name}.{place}", message, ref, sorted(getattr(reg, section)))
                )
        uses.update(f"labelled_sets.{s}" for metric in matrix.metrics for s in _labelled_sets_of(reg, metric))
        for text in matrix.sources:
            release = _release_of(reg, text, broken)
            if release is not None:
                uses.add(f"releases.{release}")
        try:
            _check_sources(reg, name, matrix, file, broken)
        except RegistryError as exc:
            found.append(exc)
        if found:
            reg._problems += [(f"matrices.{name}", error) for error in found]
            del reg.matrices[name]


def _references(matrix: MatrixEntry) -> list[tuple[str, str, str, str]]:
    """(section, place in the matrix, name, message when undefined) of every entry a matrix names."""
    refs = [
        (field, f"{field}[{i}]", ref, f"not defined in {field}")
        for field in ("models", "compressions", "saes", "metrics")
        for i, ref in enumerate(getattr(matrix, field))
    ]
    for i, text in enumerate(matrix.sources):
        source = parse_source(text)
        if source.kind == "pruned":
            refs.append(("pruners", f"sources[{i}]", source.pruner, "pruned:<entry>@<s> names no entry of pruners"))
    refs.append(("corpora", "corpus", matrix.corpus, "not defined in corpora"))
    return refs


def _release_of(reg: Registry, text: str, broken: set[str]) -> str | None:
    """The release a ``loaded:`` source names (a valid one, or one whose entry is broken), else None."""
    source = parse_source(text)
    if source.kind != "loaded" or source.path is None:
        return None
    name = source.path.partition("/")[0]
    return name if name in reg.releases or f"releases.{name}" in broken else None


def _check_sources(reg: Registry, name: str, matrix: MatrixEntry, file: str, broken: set[str]) -> None:
    loaded = [(i, text) for i, text in enumerate(matrix.sources) if parse_source(text).kind == "loaded"]
    derived = [text for text in matrix.sources if parse_source(text).kind in ("retrained", "finetuned", "pruned")]
    if len(loaded) > 1 and derived:
        message = f"{derived[0]} derives from the matrix's loaded: SAE, and it has {len(loaded)}: one per matrix"
        raise RegistryError(file, f"matrices.{name}.sources", message, [text for _, text in loaded])
    for i, text in enumerate(matrix.sources if loaded else []):
        if parse_source(text).kind in ("finetuned", "pruned") and parse_source(text).seed is not None:
            message = "derives from the matrix's loaded: SAE, which has no seed: drop @seed=<n>"
            raise RegistryError(file, f"matrices.{name}.sources[{i}]", message, text)
    for i, text in loaded:
        if f"releases.{_release_of(reg, text, broken)}" in broken:
            continue  # the release's own problems are the matrix's (it uses the release)
        where = f"matrices.{name}.sources[{i}]"
        ref = reg._loaded.get(text) or resolve_loaded(text, reg.releases, reg.origins, file, where)
        check_hooks(ref, matrix.hooks, file, name, i)
        reg._loaded[text] = ref


def _expand_sweeps(merged: dict[str, dict[str, Any]], origins: dict[str, str]) -> list[tuple[str, RegistryError]]:
    """``expand_sweeps``, with each swept ``saes`` entry whose sweep is malformed left out of ``merged`` and its
    problem recorded under "saes.<name>" (a member name that clashes with another entry stays an error of the
    files as a whole)."""
    found: list[tuple[str, RegistryError]] = []
    saes = merged.get("saes", {})
    for name, raw in list(saes.items()):
        if isinstance(raw, dict) and SWEEP in raw:
            try:
                expand_sweeps({"saes": {name: copy.deepcopy(raw)}}, {f"saes.{name}": origins[f"saes.{name}"]})
            except RegistryError as exc:
                found.append((f"saes.{name}", exc))
                del saes[name]
    expand_sweeps(merged, origins)
    return found


def load_registry(files: list[Path], plugins: Plugins, matrix: str | None = None) -> Registry:
    """Read, merge and validate registry files (plus files contributed by plugins).

    A problem of the files as a whole (YAML, an unknown section, a name defined twice) is raised at once. The
    problems of single entries are collected, every one of them: with ``matrix`` None all are raised together;
    with a matrix's name only those of that matrix and of the entries it uses are, and the others are kept as
    the registry's ``warnings`` (a broken matrix or entry still raises its problems when ``Registry.matrix`` or
    ``Registry.component`` is asked for it)."""
    merged: dict[str, dict[str, Any]] = {}
    origins: dict[str, str] = {}
    for file in [*files, *plugins.registry_files()]:
        _merge_file(merged, origins, Path(file))
    found = _expand_sweeps(merged, origins)
    reg = _validate_entries(merged, origins, found)
    reg._files = [Path(f) for f in files]
    _resolve_components(reg, plugins)
    _check_labelled_sets(reg)
    _check_matrices(reg)
    _raise_all(reg.problems(matrix))
    reg._warnings = reg.problems()
    return reg
