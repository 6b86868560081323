"""One node of a matrix's artifact graph computed from a ``WorkerSpec`` alone, for executors whose workers run in
other processes or machines (the Ray executor): the worker loads the plugins installed there and rebuilds the
driver's run from the same registry files, store and cache."""

from __future__ import annotations

from pathlib import Path

import torch

from saex.config.matrix import expand
from saex.config.registry import load_registry
from saex.plugin.manager import load_plugins
from saex.run.job import WorkerSpec
from saex.run.runner import Runner
from saex.storage.cache import Cache
from saex.storage.results import ResultsStore


def worker_step(spec: WorkerSpec, model: str, compression: str | None, hook: str | None, *after: object) -> str:
    """Prepare the artifacts of (model, compression) when ``hook`` is None, else score the pending cells of
    (model, compression, hook); returns ``model/compression/hook``. ``after``: results of the steps this one
    depends on (an executor passes them to order the graph)."""
    plugins = load_plugins()
    registry = load_registry([Path(f) for f in spec.registry_files], plugins)
    runner = Runner(plugins, registry, ResultsStore(Path(spec.store)), Cache(Path(spec.cache)), progress=False)
    cells = [
        c
        for c in expand(spec.matrix, registry.matrix(spec.matrix))
        if c.key(registry) in spec.pending
        and c.model == model
        and c.compression == compression
        and (hook is None or c.hook == hook)
    ]
    session = runner.open_model(spec.matrix, model, torch.device(spec.device))
    if hook is None:
        runner.prepare(session, cells)
    else:
        runner.score(session, cells)
    return f"{model}/{compression}/{hook}"
