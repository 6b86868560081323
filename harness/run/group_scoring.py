"""Scoring one (scored model, hook) group of cells: claim each cell in the store, obtain its SAE, run the per-SAE
metrics, then the splice metrics of every SAE of the group together (one prefix pass, one suffix pass per
variant), and write each row with its status, cost, details and versions. A failing cell is recorded as failed
with its error; the others go on."""

from __future__ import annotations

import platform
import time
import traceback
from collections.abc import Callable

import torch
import transformers

from saex._version import __version__
from saex.analysis.latent_store import KIND as PER_LATENT
from saex.analysis.latent_store import store_per_latent
from saex.config.matrix import Cell
from saex.config.pretrained import SAE_LABEL
from saex.config.registry import Registry, Resolved
from saex.config.sources import parse_source
from saex.data.corpus import row_blocks
from saex.model.hookpoints import HookPoint
from saex.plugin.manager import Plugins
from saex.plugin.protocols import Metric, MetricContext
from saex.run.artifacts import Artifacts, ModelState
from saex.run.outputs import declared_outputs
from saex.run.sae_artifacts import SAEArtifact
from saex.run.scoring import sae_metrics, splice_metrics
from saex.sae.base import SAE, mean_activation
from saex.sae.splice_context import SpliceContext
from saex.storage.cache import Cache
from saex.storage.results import CellResult, ResultsStore


def versions() -> dict[str, str]:
    return {
        "saex": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


class GroupScorer:
    """Scores groups of cells into the store; ``elsewhere`` collects the cells another process had claimed."""

    def __init__(
        self,
        plugins: Plugins,
        registry: Registry,
        store: ResultsStore,
        cache: Cache,
        *,
        progress: bool,
        log: Callable[[str], None],
    ):
        self.plugins, self.registry, self.store, self.cache = plugins, registry, store, cache
        self.progress, self.log = progress, log
        self.elsewhere: list[Cell] = []  # cells skipped because another process owns them
        self._headline: list[str] | None = None  # declared headline metrics, for the per-cell summary line

    def score(
        self,
        cells: list[Cell],
        artifacts: Artifacts,
        target: ModelState,
        hook: HookPoint,
        metrics: list[Resolved[Metric]],
    ) -> None:
        """Score every cell of one (scored model, hook): per-SAE metrics, then the splice metrics of all their
        SAEs together (one prefix pass, one suffix pass per variant)."""
        started = time.perf_counter()
        running: dict[Cell, CellResult] = {}
        for cell in cells:
            key, config = cell.key(self.registry), cell.config(self.registry)
            if not self.store.claim(key, cell.matrix, config["cell"], config):
                self.log(f"cell {cell.label}: done or computed by another process, skipped")
                self.elsewhere.append(cell)
                continue
            self._notify("cell_started", cell=cell)
            running[cell] = CellResult(key, cell.matrix, config["cell"], "running", versions=versions(), config=config)
        saes: dict[Cell, SAE] = {}
        for cell, result in running.items():
            try:
                if target.error:
                    raise RuntimeError(target.error)
                sae = self.cell_sae(cell, artifacts, target, hook, result)
                with artifacts.timed(f"per-SAE metrics on {target.label}"):
                    values = self._sae_metrics(cell, sae, artifacts, target, hook, metrics, result)
                result.metrics = values
                saes[cell] = sae
            except Exception as exc:
                _fail(result, exc)
        if saes:
            with artifacts.timed(f"splice metrics on {target.label}"):
                self._splice(saes, running, artifacts, target, hook, metrics)
            scored = [running[cell] for cell in saes if running[cell].status == "running"]
            try:
                loss = artifacts.model_loss(target) if scored else {}
            except Exception as exc:
                for result in scored:
                    _fail(result, exc)
            else:
                for result in scored:
                    result.metrics.update(loss)
        for cell, result in running.items():
            if result.status == "running":
                result.status = "done"
            if target.details:
                result.details["compression"] = target.details
            self.store.finish(result)  # records the values it keeps as null in details["absent_metrics"]
            self.log(self._summary(cell, result, time.perf_counter() - started))
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
            originals = {label: self._original_sae(by_label[label], artifacts, hook) for label in labels}
            ctx = SpliceContext(
                target.model,
                hook,
                s.blocks.eval,
                s.loaded.tokenizer,
                s.device,
                chosen,
                mean,
                reference_saes={label: sae for label, sae in originals.items() if sae is not None},
                progress=self.progress,
                prefixes=target.prefixes,
                clean_loss=artifacts.clean_loss(target),
            )
            return splice_metrics(metrics, ctx)

        try:
            found = score(list(by_label))
        except Exception as exc:
            if len(by_label) == 1:
                (label, cell), *_ = by_label.items()
                _fail(running[cell], exc, f"splice metrics of SAE {label}: ")
                return
            self.log("  splice metrics failed for the group; scoring each SAE alone")
            found = {}
            for label, cell in by_label.items():
                try:
                    found.update(score([label]))
                except Exception as single:
                    _fail(running[cell], single, f"splice metrics of SAE {label}: ")
        for label, values in found.items():
            running[by_label[label]].metrics.update(values)

    def _summary(self, cell: Cell, result: CellResult, seconds: float) -> str:
        """The one line a finished cell prints: its status, the group's seconds so far, its headline metrics, and
        a warning naming the values that are not finite (stored as null)."""
        if result.status != "done":
            return f"cell {cell.label}: {result.status}: {result.error}"
        if self._headline is None:
            self._headline = [n for n, o in declared_outputs(self.plugins).items() if o.headline]
        shown = [f"{n} {v:.4g}" for n in self._headline if isinstance(v := result.metrics.get(n), float)]
        line = f"cell {cell.label}: done ({seconds:.1f} s into its group) " + ", ".join(shown)
        undefined = list(result.details.get("absent_metrics", {}))
        return line + (f"; warning: {', '.join(undefined)} not finite, stored as null" if undefined else "")

    def _notify(self, hook_name: str, **kwargs: object) -> None:
        """Call a lifecycle hook; a plugin that raises is logged and never stops the run or loses a result."""
        try:
            getattr(self.plugins.manager.hook, hook_name)(**kwargs)
        except Exception as exc:
            self.log(f"  plugin hook {hook_name} raised {type(exc).__name__}: {exc} (ignored)")

    def sae_artifact(self, cell: Cell, artifacts: Artifacts, target: ModelState, hook: HookPoint) -> SAEArtifact:
        """The SAE ``cell`` scores on ``target`` with its cache key, cost and details (from the cache when there)."""
        source = parse_source(cell.source)
        pruner = self.registry.component("pruners", source.pruner) if source.kind == "pruned" else None
        loaded = self.registry.loaded_sae(cell.matrix, cell.source)
        return artifacts.saes.sae(source, self.registry.component("saes", cell.sae), target, hook, pruner, loaded)

    def cell_sae(
        self, cell: Cell, artifacts: Artifacts, target: ModelState, hook: HookPoint, result: CellResult
    ) -> SAE:
        artifact = self.sae_artifact(cell, artifacts, target, hook)
        result.cost, result.details = artifact.cost, dict(artifact.details)
        if (loaded := self.registry.loaded_sae(cell.matrix, cell.source)) is not None:
            # the SAE is (or derives from) a loaded one: named by its own identity, not the `saes` entry
            result.details[SAE_LABEL] = loaded.label
        return artifact.sae

    def _original_sae(self, cell: Cell, artifacts: Artifacts, hook: HookPoint) -> SAE | None:
        """The SAE ``cell``'s SAE is compared with (its ``original``), or None when it is an original itself."""
        if parse_source(cell.source).is_original:
            return None
        loaded = self.registry.loaded_sae(cell.matrix, cell.source)
        return artifacts.saes.original(self.registry.component("saes", cell.sae), hook, loaded).sae

    def _sae_metrics(
        self,
        cell: Cell,
        sae: SAE,
        artifacts: Artifacts,
        target: ModelState,
        hook: HookPoint,
        metrics: list[Resolved[Metric]],
        result: CellResult,
    ) -> dict[str, float]:
        """The per-SAE metrics of ``cell``; what they store besides their values (per-latent tensors, details)
        goes into ``result``'s details."""
        base, s = artifacts.base, artifacts.setting
        ctx = MetricContext(
            sae,
            artifacts.activations(target, "eval", hook),
            s.device,
            reference_activations=artifacts.activations(base, "eval", hook) if target is not base else None,
            reference_sae=self._original_sae(cell, artifacts, hook),
            eval_blocks=row_blocks(s.blocks.eval, s.loaded.tokenizer),
            labelled=lambda name: artifacts.labelled(target, hook, name),
            reference_labelled=(lambda name: artifacts.labelled(base, hook, name)) if target is not base else None,
        )
        values = sae_metrics(metrics, ctx)
        result.details.update(ctx.details)
        if ctx.per_latent:
            result.details[PER_LATENT] = store_per_latent(self.cache, result.key, ctx.per_latent)
        return values


def _fail(result: CellResult, exc: Exception, context: str = "") -> None:
    result.status = "failed"
    result.error = f"{context}{type(exc).__name__}: {exc}"
    result.details["traceback"] = traceback.format_exc(limit=8)
