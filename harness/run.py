"""The local executor: schedules a matrix's cells and owns their lifecycle in the results store.

Per model: load M and pack the token splits, then score M's cells and, per compression, M_c's cells, one
(scored model, hook) group at a time: per-SAE metrics per cell, then the splice metrics of the whole group
together. Artifacts (models, activations, SAEs, their keys and costs) come from ``harness/artifacts.py``,
metric dispatch from ``harness/scoring.py``. A failing cell is recorded as failed with its error; the others
go on. Every SAE scored on a given model reads the same eval activations and the same clean pass.
"""

from __future__ import annotations

import platform
import traceback
from collections.abc import Callable

import torch
import transformers

import saex
from saex.artifacts import Artifacts, ModelState, Setting
from saex.cache import Cache
from saex.corpus import TokenBlocks, token_blocks
from saex.hookpoints import HookPoint, check_hook, parse_hook
from saex.manager import Plugins
from saex.matrix import BASE, Cell, expand
from saex.models import resolve_device
from saex.protocols import Corpus, LoadedModel, Metric, MetricContext, ModelSource, SpliceContext
from saex.registry import MatrixEntry, Registry, RegistryError, Resolved
from saex.sae import SAE, mean_activation
from saex.scoring import sae_metrics, splice_metrics
from saex.sources import parse_source
from saex.store import CellResult, ResultsStore


def versions() -> dict[str, str]:
    return {
        "saex": saex.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


class Runner:
    def __init__(
        self,
        plugins: Plugins,
        registry: Registry,
        store: ResultsStore,
        cache: Cache,
        *,
        device: str | None = None,
        progress: bool = True,
        log: Callable[[str], None] = print,
    ):
        self.plugins, self.registry, self.store, self.cache = plugins, registry, store, cache
        self.device_override, self.progress, self.log = device, progress, log

    def run(self, name: str) -> list[CellResult]:
        matrix = self.registry.matrix(name)
        cells = expand(name, matrix)
        pending = [c for c in cells if self.store.status(c.key(self.registry)) != "done"]
        done = len(cells) - len(pending)
        self.log(f"matrix {name}: {len(cells)} cells, {done} already done, {len(pending)} to run")
        device = resolve_device(self.device_override or matrix.device)
        for model in self.registry.matrix_components(name, "models"):
            todo = [c for c in pending if c.model == model.name]
            if todo:
                self._run_model(name, matrix, model, todo, device)
        return [r for c in cells if (r := self.store.get(c.key(self.registry))) is not None]

    # --- per model ----------------------------------------------------------------------------------------

    def _run_model(
        self, name: str, matrix: MatrixEntry, model: Resolved[ModelSource], cells: list[Cell], device: torch.device
    ) -> None:
        loaded = model.component.load(model.params, device)
        if matrix.dtype == "bfloat16":
            loaded.model.to(torch.bfloat16)
        hooks = [parse_hook(h) for h in matrix.hooks]
        for index, hook in enumerate(hooks):
            try:
                check_hook(loaded.model, hook)
            except ValueError as exc:  # only now is the model's depth known: still bad input, not a crash
                raise RegistryError(
                    self.registry.origins.get(f"matrices.{name}", "registry"),
                    f"matrices.{name}.hooks[{index}]",
                    f"model {model.name!r}: {exc}",
                ) from exc
        setting = Setting(matrix, loaded, self._blocks(name, matrix, loaded), hooks, device)
        architectures = {n: self.plugins.get("sae", n) for n in self.plugins.names("sae")}
        artifacts = Artifacts(self.cache, setting, architectures, progress=self.progress, log=self.log)
        metrics = self.registry.matrix_components(name, "metrics")
        groups: list[tuple[ModelState, list[Cell]]] = [(artifacts.base, [c for c in cells if c.scored_on == BASE])]
        for compression in self.registry.matrix_components(name, "compressions"):
            todo = [c for c in cells if c.compression == compression.name]
            if todo:
                groups.append((artifacts.compressed(compression), todo))
        for target, todo in groups:
            for hook in hooks:
                group = [c for c in todo if c.hook == str(hook)]
                if group:
                    self._score_group(group, artifacts, target, hook, metrics)
            if target is not artifacts.base:
                target.release()

    def _blocks(self, name: str, matrix: MatrixEntry, loaded: LoadedModel) -> TokenBlocks:
        corpus: Resolved[Corpus] = self.registry.component("corpora", matrix.corpus)
        return token_blocks(
            self.cache,
            lambda: corpus.component.documents(corpus.params),
            corpus.component.fingerprint(corpus.params),
            loaded.tokenizer,
            matrix.block_size,
            matrix.tokens.model_dump(),
            progress=self.progress,
        )

    # --- per (scored model, hook) -----------------------------------------------------------------------------

    def _score_group(
        self,
        cells: list[Cell],
        artifacts: Artifacts,
        target: ModelState,
        hook: HookPoint,
        metrics: list[Resolved[Metric]],
    ) -> None:
        """Score every cell of one (scored model, hook): per-SAE metrics, then the splice metrics of all their
        SAEs together (one prefix pass, one suffix pass per variant)."""
        running: dict[Cell, CellResult] = {}
        for cell in cells:
            key, config = cell.key(self.registry), cell.config(self.registry)
            self.store.start(key, cell.matrix, config["cell"], config)
            self.plugins.manager.hook.cell_started(cell=cell)
            running[cell] = CellResult(key, cell.matrix, config["cell"], "running", versions=versions(), config=config)
        saes: dict[Cell, SAE] = {}
        for cell, result in running.items():
            self.log(f"cell {cell.label}")
            try:
                if target.error:
                    raise RuntimeError(target.error)
                sae = self._cell_sae(cell, artifacts, target, hook, result)
                result.metrics = {
                    **self._sae_metrics(cell, sae, artifacts, target, hook, metrics),
                    **artifacts.model_loss(target),
                }
                saes[cell] = sae
            except Exception as exc:
                _fail(result, exc, self.log)
        if saes:
            try:
                by_label = {f"{c.sae}/{c.source}": c for c in saes}  # unique within a (scored model, hook) group
                sctx = SpliceContext(
                    target.model,
                    hook,
                    artifacts.setting.blocks.eval,
                    artifacts.setting.loaded.tokenizer,
                    artifacts.setting.device,
                    {label: saes[c] for label, c in by_label.items()},
                    mean_activation=mean_activation(artifacts.activations(target, "eval", hook)).float(),
                )
                for label, values in splice_metrics(metrics, sctx).items():
                    running[by_label[label]].metrics.update(values)
            except Exception as exc:
                for cell in saes:
                    _fail(running[cell], exc, self.log)
        for cell, result in running.items():
            if result.status == "running":
                result.status = "done"
            if target.details:
                result.details["compression"] = target.details
            self.store.finish(result)
            self.plugins.manager.hook.cell_finished(cell=cell, result=result)

    def _cell_sae(
        self, cell: Cell, artifacts: Artifacts, target: ModelState, hook: HookPoint, result: CellResult
    ) -> SAE:
        source = parse_source(cell.source)
        pruner = self.registry.component("pruners", source.pruner) if source.kind == "pruned" else None
        artifact = artifacts.sae(source, self.registry.component("saes", cell.sae), target, hook, pruner)
        result.cost, result.details = artifact.cost, artifact.details
        return artifact.sae

    def _sae_metrics(
        self,
        cell: Cell,
        sae: SAE,
        artifacts: Artifacts,
        target: ModelState,
        hook: HookPoint,
        metrics: list[Resolved[Metric]],
    ) -> dict[str, float]:
        base = artifacts.base
        reference_sae = None
        if parse_source(cell.source).kind in ("retrained", "pruned"):
            reference_sae = artifacts.trained(self.registry.component("saes", cell.sae), base, hook).sae
        ctx = MetricContext(
            sae,
            artifacts.activations(target, "eval", hook),
            artifacts.setting.device,
            reference_activations=artifacts.activations(base, "eval", hook) if target is not base else None,
            reference_sae=reference_sae,
        )
        return sae_metrics(metrics, ctx)


def _fail(result: CellResult, exc: Exception, log: Callable[[str], None]) -> None:
    result.status = "failed"
    result.error = f"{type(exc).__name__}: {exc}"
    result.details["traceback"] = traceback.format_exc(limit=8)
    log(f"  failed: {result.error}")
