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
        device = self._device(name, matrix)
        for model in self.registry.matrix_components(name, "models"):
            todo = [c for c in pending if c.model == model.name]
            if todo:
                self._run_model(name, matrix, model, todo, device)
        return [r for c in cells if (r := self.store.get(c.key(self.registry))) is not None]

    def _bad_input(self, name: str, path: str, message: str) -> RegistryError:
        """A problem with the matrix found only at run time, reported like any registry error (exit 2)."""
        return RegistryError(self.registry.origins.get(f"matrices.{name}", "registry"), path, message)

    def _device(self, name: str, matrix: MatrixEntry) -> torch.device:
        where = "--device" if self.device_override else f"matrices.{name}.device"
        try:
            return resolve_device(self.device_override or matrix.device)
        except (RuntimeError, ValueError) as exc:
            raise self._bad_input(name, where, str(exc)) from None

    # --- per model ----------------------------------------------------------------------------------------

    def _run_model(
        self, name: str, matrix: MatrixEntry, model: Resolved[ModelSource], cells: list[Cell], device: torch.device
    ) -> None:
        """Everything only the loaded model can tell (its config, depth, layout, the corpus under its tokenizer)
        is checked before anything is computed, and reported like a registry error."""
        try:
            loaded = model.component.load(model.params, device)
        except Exception as exc:  # e.g. a config the model class rejects (heads not dividing d): nothing ran yet
            raise RegistryError(
                self.registry.origins.get(f"models.{model.name}", "registry"),
                f"models.{model.name}.params",
                f"cannot build the model: {type(exc).__name__}: {exc}",
            ) from None
        if matrix.dtype == "bfloat16":
            loaded.model.to(torch.bfloat16)
        hooks = [parse_hook(h) for h in matrix.hooks]
        for index, hook in enumerate(hooks):
            try:
                check_hook(loaded.model, hook)
            except ValueError as exc:  # only now is the model's depth and layout known: still bad input
                raise self._bad_input(name, f"matrices.{name}.hooks[{index}]", f"model {model.name!r}: {exc}") from None
        try:
            blocks = self._blocks(matrix, loaded)
        except ValueError as exc:  # the corpus is too small for the token budgets
            raise self._bad_input(name, f"matrices.{name}.tokens", str(exc)) from None
        setting = Setting(matrix, loaded, blocks, hooks, device)
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

    def _blocks(self, matrix: MatrixEntry, loaded: LoadedModel) -> TokenBlocks:
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
            self._notify("cell_started", cell=cell)
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
            self._splice(saes, running, artifacts, target, hook, metrics)
        for cell, result in running.items():
            if result.status == "running":
                result.status = "done"
            if target.details:
                result.details["compression"] = target.details
            self.store.finish(result)
            self._notify("cell_finished", cell=cell, result=result)

    def _splice(
        self,
        saes: dict[Cell, SAE],
        running: dict[Cell, CellResult],
        artifacts: Artifacts,
        target: ModelState,
        hook: HookPoint,
        metrics: list[Resolved[Metric]],
    ) -> None:
        """Splice metrics of every SAE of the group in one pass; when that fails, each SAE alone, so an SAE that
        breaks splicing fails only its own cells, named (the others' numbers are the same: same tokens, same
        clean pass)."""
        by_label = {f"{c.sae}/{c.source}": c for c in saes}  # unique within a (scored model, hook) group
        s = artifacts.setting
        mean = mean_activation(artifacts.activations(target, "eval", hook)).float()

        def score(labels: list[str]) -> dict[str, dict[str, float]]:
            chosen = {label: saes[by_label[label]] for label in labels}
            ctx = SpliceContext(target.model, hook, s.blocks.eval, s.loaded.tokenizer, s.device, chosen, mean)
            return splice_metrics(metrics, ctx)

        try:
            found = score(list(by_label))
        except Exception as exc:
            if len(by_label) == 1:
                (label, cell), *_ = by_label.items()
                _fail(running[cell], exc, self.log, f"splice metrics of SAE {label}: ")
                return
            self.log("  splice metrics failed for the group; scoring each SAE alone")
            found = {}
            for label, cell in by_label.items():
                try:
                    found.update(score([label]))
                except Exception as single:
                    _fail(running[cell], single, self.log, f"splice metrics of SAE {label}: ")
        for label, values in found.items():
            running[by_label[label]].metrics.update(values)

    def _notify(self, hook_name: str, **kwargs: object) -> None:
        """Call a lifecycle hook; a plugin that raises is logged and never stops the run or loses a result."""
        try:
            getattr(self.plugins.manager.hook, hook_name)(**kwargs)
        except Exception as exc:
            self.log(f"  plugin hook {hook_name} raised {type(exc).__name__}: {exc} (ignored)")

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


def _fail(result: CellResult, exc: Exception, log: Callable[[str], None], context: str = "") -> None:
    result.status = "failed"
    result.error = f"{context}{type(exc).__name__}: {exc}"
    result.details["traceback"] = traceback.format_exc(limit=8)
    log(f"  failed: {result.error}")
