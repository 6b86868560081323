"""A matrix expands into cells: one per (model, hook, SAE arch, SAE source, scored-on model).

``original`` and ``loaded:*`` are scored on the base model once per (model, hook, arch), independent of the
compression, and on every compressed model; ``retrained``, ``finetuned:*`` and ``pruned:*`` are scored on the
compressed model they were trained, fine-tuned or calibrated on. In a matrix with a ``loaded:`` source, those
derive from the loaded SAE (``Registry.loaded_sae``), whose files are then part of their cells' identity. A
source's ``@seed=<n>`` is part of its text, so seeded cells have keys of their own.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from saex.config.registry import MatrixEntry, Registry
from saex.config.sources import parse_source
from saex.storage.cache import cache_key

BASE = "base"  # the scored-on value for the uncompressed model


@dataclass(frozen=True)
class Cell:
    matrix: str
    model: str
    compression: str | None  # None when scored on the base model
    hook: str
    sae: str
    source: str
    scored_on: str  # BASE or "compressed"

    @property
    def label(self) -> str:
        target = "M" if self.scored_on == BASE else f"M_c[{self.compression}]"
        return f"{self.model} {self.hook} {self.sae}/{self.source} on {target}"

    def config(self, registry: Registry) -> dict:
        """Everything that determines this cell's result: the cell plus the identity of every resolved
        component it uses (plugin and params with defaults filled in)."""
        matrix = registry.matrices[self.matrix]
        source = parse_source(self.source)
        resolved = {
            "model": registry.component("models", self.model).identity(),
            "compression": registry.component("compressions", self.compression).identity()
            if self.compression
            else None,
            "sae": registry.component("saes", self.sae).identity(),
            "pruner": registry.component("pruners", source.pruner).identity() if source.kind == "pruned" else None,
            "corpus": registry.component("corpora", matrix.corpus).identity(),
            "metrics": {m: registry.component("metrics", m).identity() for m in matrix.metrics},
            # precision is keyed as "dtype", its name before, so results from then keep their keys
            "run": {**matrix.model_dump(include={"tokens", "block_size", "seed"}), "dtype": matrix.precision},
        }
        loaded = registry.loaded_sae(self.matrix, self.source)
        if loaded is not None:
            resolved["loaded"] = loaded.identity()
        return {"cell": asdict(self), "resolved": resolved}

    def key(self, registry: Registry) -> str:
        config = self.config(registry)
        config["cell"].pop("matrix")  # the same cell in two matrices is the same result
        return cache_key(config)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def expand(name: str, matrix: MatrixEntry) -> list[Cell]:
    cells: list[Cell] = []
    for model in matrix.models:
        for hook in matrix.hooks:
            for sae in matrix.saes:
                for source in matrix.sources:
                    if parse_source(source).on_base_too:
                        cells.append(Cell(name, model, None, hook, sae, source, BASE))
                for compression in matrix.compressions:
                    for source in matrix.sources:
                        cells.append(Cell(name, model, compression, hook, sae, source, "compressed"))
    return cells


@dataclass(frozen=True)
class Matrix:
    """A matrix resolved once (``resolve_matrix``) and handed on as an object: its name, validated entry and
    cells, so the runner, executors, workers and the feature browser never look the name up again."""

    name: str
    entry: MatrixEntry
    cells: tuple[Cell, ...]


def resolve_matrix(registry: Registry, name: str) -> Matrix:
    """The matrix ``name`` of ``registry`` (its problems raised, as ``Registry.matrix`` does) with its cells."""
    entry = registry.matrix(name)
    return Matrix(name, entry, tuple(expand(name, entry)))
