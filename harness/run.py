"""The local executor: schedules a matrix's cells and owns their lifecycle in the results store.

Per model: load M and pack the token splits, then score M's cells and, per compression, M_c's cells, one
(scored model, hook) group at a time: per-SAE metrics per cell, then the splice metrics of the whole group
together. Artifacts (models, activations, SAEs, their keys and costs) come from ``harness/artifacts.py``,
metric dispatch from ``harness/scoring.py``. A failing cell is recorded as failed with its error; the others
go on. Every SAE scored on a given model reads the same eval activations and the same clean pass.
"""

from __future__ import annotations

import platform
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import transformers

import saex
from saex.artifacts import Artifacts, ModelState, SAEArtifact, Setting
from saex.cache import Cache
from saex.corpus import TokenBlocks, row_blocks, token_blocks
from saex.hookpoints import HookPoint, capture, check_hook, parse_hook
from saex.manager import Plugins
from saex.matrix import BASE, Cell, expand
from saex.models import resolve_device
from saex.per_latent import KIND as PER_LATENT
from saex.per_latent import store_per_latent
from saex.precision import unsupported
from saex.protocols import Corpus, Executor, LoadedModel, Metric, MetricContext, ModelSource, SpliceContext
from saex.registry import ComponentEntry, MatrixEntry, Registry, RegistryError, Resolved
from saex.sae import SAE, mean_activation
from saex.scoring import sae_metrics, splice_metrics
from saex.sources import parse_source
from saex.spine_outputs import declared_outputs
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
        self.poll_seconds = 2.0  # while waiting for cells another process computes
        self._elsewhere: list[Cell] = []  # cells skipped because another process owns them
        self._headline: list[str] | None = None  # declared headline metrics, for the per-cell summary line

    def run(self, name: str, executor: str = "local") -> list[CellResult]:
        """Compute the matrix's unfinished cells with ``executor`` (an ``executors`` registry entry or an
        executor plugin's name) and return every cell's row."""
        matrix = self.registry.matrix(name)
        chosen = self._executor(name, executor)
        cells = expand(name, matrix)
        pending = [c for c in cells if self.store.status(c.key(self.registry)) != "done"]
        done = len(cells) - len(pending)
        self.log(f"matrix {name}: {len(cells)} cells, {done} already done, {len(pending)} to run ({executor})")
        device = self._device(name, matrix)
        while pending:
            self._elsewhere = []
            chosen.component.execute(Job(self, name, pending, device), chosen.params)
            pending = self._wait_for_others(self._elsewhere)
        return [r for c in cells if (r := self.store.get(c.key(self.registry))) is not None]

    def _executor(self, name: str, executor: str) -> Resolved[Executor]:
        if executor in self.registry.executors:
            return self.registry.component("executors", executor)
        if executor in self.plugins.names("executor"):
            component = self.plugins.get("executor", executor)
            entry = ComponentEntry(plugin=executor)
            return Resolved("executors", executor, component, component.Params(), entry)
        choices = sorted({*self.registry.executors, *self.plugins.names("executor")})
        raise RegistryError("--executor", "--executor", "no executor of that name", executor, choices)

    def _wait_for_others(self, cells: list[Cell]) -> list[Cell]:
        """Wait while other processes compute ``cells``; returns those whose claim expired (their process
        died), for this process to compute."""
        waiting = [c for c in cells if self.store.status(c.key(self.registry)) == "running"]
        if waiting:
            self.log(f"waiting for {len(waiting)} cells another process is computing")
        while waiting := [c for c in waiting if self.store.waiting_on_others(c.key(self.registry))]:
            time.sleep(self.poll_seconds)
        return [c for c in cells if self.store.status(c.key(self.registry)) == "running"]

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

    def open_model(self, name: str, model: str, device: torch.device) -> Session:
        """Load one model of matrix ``name`` and check everything only the loaded model can tell (its config,
        depth, layout, the corpus under its tokenizer) before anything is computed, reported like a registry
        error."""
        matrix = self.registry.matrix(name)
        if reason := unsupported(matrix.precision, device):
            raise self._bad_input(name, f"matrices.{name}.precision", f"{matrix.precision!r}: {reason}")
        resolved: Resolved[ModelSource] = self.registry.component("models", model)
        start = time.perf_counter()
        try:
            loaded = resolved.component.load(resolved.params, device)
        except Exception as exc:  # e.g. a config the model class rejects (heads not dividing d): nothing ran yet
            raise RegistryError(
                self.registry.origins.get(f"models.{model}", "registry"),
                f"models.{model}.params",
                f"cannot build the model: {type(exc).__name__}: {exc}",
            ) from None
        hooks = [parse_hook(h) for h in matrix.hooks]
        for index, hook in enumerate(hooks):
            try:
                check_hook(loaded.model, hook)
            except ValueError as exc:  # only now is the model's depth and layout known: still bad input
                raise self._bad_input(name, f"matrices.{name}.hooks[{index}]", f"model {model!r}: {exc}") from None
        self._check_loaded_widths(name, model, loaded.model, hooks, device)
        self.store.record_phase(name, model, "load model", time.perf_counter() - start)
        start = time.perf_counter()
        try:
            blocks = self._blocks(matrix, loaded)
        except ValueError as exc:  # the corpus is too small for the token budgets
            raise self._bad_input(name, f"matrices.{name}.tokens", str(exc)) from None
        self.store.record_phase(name, model, "token blocks", time.perf_counter() - start)
        setting = Setting(matrix, loaded, blocks, hooks, device)
        architectures = {n: self.plugins.get("sae", n) for n in self.plugins.names("sae")}
        artifacts = Artifacts(
            self.cache,
            setting,
            architectures,
            progress=self.progress,
            log=self.log,
            record=lambda phase, seconds: self.store.record_phase(name, model, phase, seconds),
        )
        return Session(name, artifacts, self.registry.matrix_components(name, "metrics"))

    def prepare(self, session: Session, cells: list[Cell]) -> None:
        """Compute (or find cached) every artifact ``cells`` need, without scoring: the compressed model, its
        activations and the cells' SAEs (the executors' artifact-graph steps). The scored model's loss is left to
        scoring, whose clean CE/KL pass may already give it."""
        for cell in cells:
            target, hook = session.target(cell, self.registry), parse_hook(cell.hook)
            self._cell_sae(cell, session.artifacts, target, hook, CellResult("", "", {}, "running"))
            session.artifacts.activations(target, "eval", hook)

    def score(self, session: Session, cells: list[Cell]) -> None:
        """Score ``cells``, all of one (scored model, hook), and write their rows."""
        target, hook = session.target(cells[0], self.registry), parse_hook(cells[0].hook)
        self._score_group(cells, session.artifacts, target, hook, session.metrics)

    def _check_loaded_widths(
        self, name: str, model: str, module: torch.nn.Module, hooks: list[HookPoint], device: torch.device
    ) -> None:
        """A loaded SAE reads activations as wide as the model's at its hook, known only now (a one-token pass)."""
        sources = self.registry.matrix(name).sources
        refs = [(i, self.registry.loaded_sae(name, s)) for i, s in enumerate(sources) if s.startswith("loaded:")]
        if not refs:
            return
        widths = capture(module, torch.zeros((1, 1), dtype=torch.long, device=device), hooks)
        for i, ref in refs:
            assert ref is not None
            for hook, x in widths.items():
                if x.shape[-1] != ref.file.d_in:
                    message = f"{ref.source} reads {ref.file.d_in}-wide activations; model {model!r} has {x.shape[-1]}"
                    raise self._bad_input(name, f"matrices.{name}.sources[{i}]", f"{message} at {hook}")

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
        started = time.perf_counter()
        running: dict[Cell, CellResult] = {}
        for cell in cells:
            key, config = cell.key(self.registry), cell.config(self.registry)
            if not self.store.claim(key, cell.matrix, config["cell"], config):
                self.log(f"cell {cell.label}: done or computed by another process, skipped")
                self._elsewhere.append(cell)
                continue
            self._notify("cell_started", cell=cell)
            running[cell] = CellResult(key, cell.matrix, config["cell"], "running", versions=versions(), config=config)
        saes: dict[Cell, SAE] = {}
        for cell, result in running.items():
            self.log(f"cell {cell.label}")
            try:
                if target.error:
                    raise RuntimeError(target.error)
                sae = self._cell_sae(cell, artifacts, target, hook, result)
                with artifacts.timed(f"per-SAE metrics on {target.label}"):
                    values = self._sae_metrics(cell, sae, artifacts, target, hook, metrics, result)
                result.metrics = values
                saes[cell] = sae
            except Exception as exc:
                _fail(result, exc, self.log)
        if saes:
            with artifacts.timed(f"splice metrics on {target.label}"):
                self._splice(saes, running, artifacts, target, hook, metrics)
            scored = [running[cell] for cell in saes if running[cell].status == "running"]
            try:
                loss = artifacts.model_loss(target) if scored else {}
            except Exception as exc:
                for result in scored:
                    _fail(result, exc, self.log)
            else:
                for result in scored:
                    result.metrics.update(loss)
        for cell, result in running.items():
            if result.status == "running":
                result.status = "done"
            self.log(self._summary(cell, result, time.perf_counter() - started))
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

    def _summary(self, cell: Cell, result: CellResult, seconds: float) -> str:
        """One line per finished cell: its status, the group's seconds so far, and its headline metrics."""
        if result.status != "done":
            return f"cell {cell.label}: {result.status}: {result.error}"
        if self._headline is None:
            self._headline = [n for n, o in declared_outputs(self.plugins).items() if o.headline]
        shown = [f"{n} {v:.4g}" for n in self._headline if isinstance(v := result.metrics.get(n), float)]
        return f"cell {cell.label}: done ({seconds:.1f} s into its group) " + ", ".join(shown)

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
        return artifacts.sae(source, self.registry.component("saes", cell.sae), target, hook, pruner, loaded)

    def _cell_sae(
        self, cell: Cell, artifacts: Artifacts, target: ModelState, hook: HookPoint, result: CellResult
    ) -> SAE:
        artifact = self.sae_artifact(cell, artifacts, target, hook)
        result.cost, result.details = artifact.cost, dict(artifact.details)
        return artifact.sae

    def _original_sae(self, cell: Cell, artifacts: Artifacts, hook: HookPoint) -> SAE | None:
        """The SAE ``cell``'s SAE is compared with (its ``original``), or None when it is an original itself."""
        if parse_source(cell.source).is_original:
            return None
        loaded = self.registry.loaded_sae(cell.matrix, cell.source)
        return artifacts.original(self.registry.component("saes", cell.sae), hook, loaded).sae

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
        )
        values = sae_metrics(metrics, ctx)
        result.details.update(ctx.details)
        if ctx.per_latent:
            result.details[PER_LATENT] = store_per_latent(self.cache, result.key, ctx.per_latent)
        return values


def _fail(result: CellResult, exc: Exception, log: Callable[[str], None], context: str = "") -> None:
    result.status = "failed"
    result.error = f"{context}{type(exc).__name__}: {exc}"
    result.details["traceback"] = traceback.format_exc(limit=8)
    log(f"  failed: {result.error}")


@dataclass
class Session:
    """One loaded and checked model of a matrix with its artifacts; M_c states are built lazily, once."""

    matrix: str
    artifacts: Artifacts
    metrics: list[Resolved[Metric]]
    _targets: dict[str, ModelState] = field(default_factory=dict)

    def target(self, cell: Cell, registry: Registry) -> ModelState:
        """The model ``cell`` is scored on: M, or M_c of its compression."""
        if cell.scored_on == BASE or cell.compression is None:
            return self.artifacts.base
        if cell.compression not in self._targets:
            self._targets[cell.compression] = self.artifacts.compressed(
                registry.component("compressions", cell.compression)
            )
        return self._targets[cell.compression]

    def release(self, compression: str) -> None:
        """Drop M_c's weights once its cells are scored (what was computed from it stays)."""
        if compression in self._targets:
            self._targets[compression].release()


@dataclass
class Job:
    """What an executor computes: the pending cells of one matrix, and the runner whose steps compute them.

    ``groups()`` orders the cells as the artifact graph runs: per model, M's cells, then each compression's;
    within each, one group per hook (the unit ``Runner.score`` scores together)."""

    runner: Runner
    matrix: str
    cells: list[Cell]
    device: torch.device

    def models(self) -> list[str]:
        return [m for m in self.runner.registry.matrix(self.matrix).models if any(c.model == m for c in self.cells)]

    def groups(self, model: str) -> list[tuple[str | None, list[Cell]]]:
        """(compression or None for M, cells of one hook) in computation order, for one model."""
        matrix = self.runner.registry.matrix(self.matrix)
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
