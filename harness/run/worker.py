"""One node of a matrix's artifact graph computed from a ``WorkerSpec`` alone, for executors whose workers run in
other processes or machines (the Ray executor): the worker loads the plugins installed there and rebuilds the
driver's run from the same registry files, store and cache, claiming cells in the driver's name."""

from __future__ import annotations

from pathlib import Path

import torch

from saex.config.matrix import resolve_matrix
from saex.config.registry import RegistryError, load_registry
from saex.plugin.manager import PluginError, load_plugins
from saex.plugin.protocols import ExecutorError
from saex.run.job import WorkerSpec
from saex.run.runner import Runner
from saex.storage.cache import Cache
from saex.storage.results import ResultsStore, StoreError


def worker_step(spec: WorkerSpec, model: str, compression: str | None, hook: str | None, *after: object) -> list[str]:
    """Prepare the artifacts of (model, compression) when ``hook`` is None, else score the pending cells of
    (model, compression, hook). Returns one line per cell it finished (done, failed, or skipped because another
    process computes it; nothing for a preparing step), for the driver to print. ``after``: results of the steps
    this one depends on (an executor passes them to order the graph). Bad input found here (the registry as the
    worker reads it, its plugins, the store) is raised as ``ExecutorError`` with the same message, an error that
    travels back to the driver (those errors' own types do not survive pickling) and is exit 2 there too."""
    try:
        return _step(spec, model, compression, hook)
    except (RegistryError, PluginError, StoreError) as exc:
        raise ExecutorError(str(exc)) from None


def _step(spec: WorkerSpec, model: str, compression: str | None, hook: str | None) -> list[str]:
    plugins = load_plugins()
    registry = load_registry([Path(f) for f in spec.registry_files], plugins, matrix=spec.matrix)  # as the driver
    store = ResultsStore(Path(spec.store))
    if spec.owner:
        store.owner = spec.owner
    lines: list[str] = []
    runner = Runner(plugins, registry, store, Cache(Path(spec.cache)), progress=False, log=lines.append)
    matrix = resolve_matrix(registry, spec.matrix)
    cells = [
        c
        for c in matrix.cells
        if c.key(registry) in spec.pending
        and c.model == model
        and c.compression == compression
        and (hook is None or c.hook == hook)
    ]
    try:
        session = runner.open_model(matrix, model, torch.device(spec.device))
        if hook is None:
            runner.prepare(session, cells)
            return []
        runner.score(session, cells)
    finally:
        store.close()
    finished = tuple(f"cell {c.label}: " for c in cells)
    return [line for line in lines if line.startswith(finished)]
