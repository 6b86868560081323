"""What an executor is handed (``saex.Job``): the pending cells of one matrix with the runner whose steps compute
them, and, for executors that compute on other machines, a ``WorkerSpec`` of plain data from which a worker
rebuilds the same run (``saex.run.worker.worker_step``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from saex.config.matrix import BASE, Cell, Matrix

if TYPE_CHECKING:
    from saex.run.runner import Runner


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to rebuild the driver's run (plain data: it travels to other machines)."""

    registry_files: tuple[str, ...]
    matrix: str
    pending: frozenset[str]  # cell keys
    store: str
    cache: str
    device: str
    owner: str = ""  # the driver's store owner: workers claim cells in its name (empty: each worker's own)


@dataclass
class Job:
    """What an executor computes: the pending cells of one matrix, and the runner whose steps compute them.

    ``groups()`` orders the cells as the artifact graph runs: per model, M's cells, then each compression's;
    within each, one group per hook (the unit ``Runner.score`` scores together)."""

    runner: Runner
    matrix: Matrix  # resolved once by the runner: pass it on (e.g. to ``runner.open_model``)
    cells: list[Cell]
    device: torch.device

    def models(self) -> list[str]:
        return [m for m in self.matrix.entry.models if any(c.model == m for c in self.cells)]

    def done(self) -> int:
        """How many of the job's cells are done in the store."""
        return sum(self.runner.store.status(c.key(self.runner.registry)) == "done" for c in self.cells)

    def release(self, reason: str) -> int:
        """Give back the job's cells still running in this process's name (an interrupted run: ``reason``, stored
        as their error), for the next run to compute; returns how many."""
        return self.runner.store.release((c.key(self.runner.registry) for c in self.cells), reason)

    def groups(self, model: str) -> list[tuple[str | None, list[Cell]]]:
        """(compression or None for M, cells of one hook) in computation order, for one model."""
        matrix = self.matrix.entry
        mine = [c for c in self.cells if c.model == model]
        out: list[tuple[str | None, list[Cell]]] = []
        for compression in [None, *matrix.compressions]:
            scored = [
                c for c in mine if (c.scored_on == BASE) == (compression is None) and c.compression == compression
            ]
            for hook in matrix.hooks:
                group = [c for c in scored if c.hook == hook]
                if group:
                    out.append((compression, group))
        return out

    def worker_spec(self) -> WorkerSpec:
        """The run as plain data (absolute paths, cell keys) for ``saex.worker_step`` on another machine. Workers
        claim cells in the driver's name, so a claim lives as long as the driver and ``release()`` gives back the
        cells of an interrupted run."""
        registry = self.runner.registry
        return WorkerSpec(
            tuple(str(f.resolve()) for f in registry.files),
            self.matrix.name,
            frozenset(c.key(registry) for c in self.cells),
            str(self.runner.store.path.resolve()),
            str(self.runner.cache.root.resolve()),
            str(self.device),
            self.runner.store.owner,
        )
