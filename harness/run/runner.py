"""The local executor: schedules a matrix's cells and owns their lifecycle in the results store.

Per model: load M and pack the token splits, then score M's cells and, per compression, M_c's cells, one
(scored model, hook) group at a time: per-SAE metrics per cell, then the splice metrics of the whole group
together. Artifacts (models, activations, SAEs, their keys and costs) come from ``saex.run.artifacts``,
metric dispatch from ``saex.run.scoring``. A failing cell is recorded as failed with its error; the others
go on. Every SAE scored on a given model reads the same eval activations and the same clean pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from saex.config.matrix import BASE, Cell, Matrix, resolve_matrix
from saex.config.registry import ComponentEntry, MatrixEntry, Registry, RegistryError, Resolved
from saex.data.corpus import TokenBlocks, token_blocks
from saex.data.labelled import LabelledTexts, MissingDataPackage
from saex.model.hookpoints import HookPoint, capture, check_hook, parse_hook
from saex.model.labelled_activations import LabelledInput, prepare_labelled
from saex.model.layouts import attach_layout
from saex.model.loading import resolve_device
from saex.model.precision import unsupported
from saex.plugin.manager import Plugins
from saex.plugin.protocols import Corpus, Executor, LabelledSet, LoadedModel, Metric, ModelSource
from saex.plugin.returns import returned
from saex.run.artifacts import Artifacts, ModelState, Setting
from saex.run.group_scoring import GroupScorer
from saex.run.job import Job
from saex.run.sae_artifacts import SAEArtifact
from saex.storage.cache import Cache
from saex.storage.results import CellResult, ResultsStore


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
        self.scorer = GroupScorer(plugins, registry, store, cache, progress=progress, log=log)

    def run(self, name: str, executor: str = "local") -> list[CellResult]:
        """Compute the matrix's unfinished cells with ``executor`` (an ``executors`` registry entry or an
        executor plugin's name) and return every cell's row. The matrix is resolved here, once, and handed on."""
        matrix = resolve_matrix(self.registry, name)
        chosen = self._executor(name, executor)
        cells = matrix.cells
        pending = [c for c in cells if self.store.status(c.key(self.registry)) != "done"]
        done = len(cells) - len(pending)
        self.log(f"matrix {name}: {len(cells)} cells, {done} already done, {len(pending)} to run ({executor})")
        device = self._device(matrix)
        while pending:
            self.scorer.elsewhere.clear()
            chosen.component.execute(Job(self, matrix, pending, device), chosen.params)
            pending = self._wait_for_others(self.scorer.elsewhere)
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

    def _bad_input(self, matrix: Matrix, path: str, message: str) -> RegistryError:
        """A problem with the matrix found only at run time, reported like any registry error (exit 2)."""
        return RegistryError(self.registry.origins.get(f"matrices.{matrix.name}", "registry"), path, message)

    def _device(self, matrix: Matrix) -> torch.device:
        where = "--device" if self.device_override else f"matrices.{matrix.name}.device"
        try:
            return resolve_device(self.device_override or matrix.entry.device)
        except (RuntimeError, ValueError) as exc:
            raise self._bad_input(matrix, where, str(exc)) from None

    # --- per model ----------------------------------------------------------------------------------------

    def open_model(self, matrix: Matrix | str, model: str, device: torch.device) -> Session:
        """Load one model of ``matrix`` (resolved, or its name) and check everything only the loaded model can
        tell (its config, depth, layout, the corpus under its tokenizer) before anything is computed, reported
        like a registry error."""
        if not isinstance(matrix, Matrix):
            matrix = resolve_matrix(self.registry, matrix)
        name, entry = matrix.name, matrix.entry
        if reason := unsupported(entry.precision, device):
            raise self._bad_input(matrix, f"matrices.{name}.precision", f"{entry.precision!r}: {reason}")
        resolved: Resolved[ModelSource] = self.registry.component("models", model)
        start = time.perf_counter()
        try:
            loaded = returned(
                resolved.component.load(resolved.params, device),
                LoadedModel,
                resolved.component.name,
                "ModelSource",
                "load",
            )
            attach_layout(loaded.model, self.plugins.layouts)
        except Exception as exc:  # e.g. a config the model class rejects (heads not dividing d): nothing ran yet
            raise RegistryError(
                self.registry.origins.get(f"models.{model}", "registry"),
                f"models.{model}.params",
                f"cannot build the model: {type(exc).__name__}: {exc}",
            ) from None
        hooks = [parse_hook(h) for h in entry.hooks]
        for index, hook in enumerate(hooks):
            try:
                check_hook(loaded.model, hook)
            except ValueError as exc:  # only now is the model's depth and layout known: still bad input
                raise self._bad_input(matrix, f"matrices.{name}.hooks[{index}]", f"model {model!r}: {exc}") from None
        self._check_loaded_widths(matrix, model, loaded.model, hooks, device)
        self.store.record_phase(name, model, "load model", time.perf_counter() - start)
        start = time.perf_counter()
        try:
            blocks = self._blocks(entry, loaded)
        except ValueError as exc:  # the corpus is too small for the token budgets
            raise self._bad_input(matrix, f"matrices.{name}.tokens", str(exc)) from None
        self.store.record_phase(name, model, "token blocks", time.perf_counter() - start)
        setting = Setting(entry, loaded, blocks, hooks, device, self._labelled(name, loaded))
        architectures = {n: self.plugins.get("sae", n) for n in self.plugins.names("sae")}
        artifacts = Artifacts(
            self.cache,
            setting,
            architectures,
            progress=self.progress,
            log=self.log,
            record=lambda phase, seconds: self.store.record_phase(name, model, phase, seconds),
        )
        return Session(matrix, artifacts, self.registry.matrix_components(name, "metrics"))

    def prepare(self, session: Session, cells: list[Cell]) -> None:
        """Compute (or find cached) every artifact ``cells`` need, without scoring: the compressed model, its
        activations and the cells' SAEs (the executors' artifact-graph steps). The scored model's loss is left to
        scoring, whose clean CE/KL pass may already give it."""
        for cell in cells:
            target, hook = session.target(cell, self.registry), parse_hook(cell.hook)
            self.scorer.cell_sae(cell, session.artifacts, target, hook, CellResult("", "", {}, "running"))
            session.artifacts.activations(target, "eval", hook)

    def score(self, session: Session, cells: list[Cell]) -> None:
        """Score ``cells``, all of one (scored model, hook), and write their rows."""
        target, hook = session.target(cells[0], self.registry), parse_hook(cells[0].hook)
        self.scorer.score(cells, session.artifacts, target, hook, session.metrics)

    def sae_artifact(self, cell: Cell, artifacts: Artifacts, target: ModelState, hook: HookPoint) -> SAEArtifact:
        """The SAE ``cell`` scores on ``target`` with its cache key, cost and details (from the cache when there)."""
        return self.scorer.sae_artifact(cell, artifacts, target, hook)

    def _labelled(self, name: str, loaded: LoadedModel) -> dict[str, LabelledInput]:
        """The labelled sets the matrix's metrics read (their params' ``labelled_sets``), loaded, split and
        tokenised once per model (the registry has checked they are defined); a set whose data is not on this
        machine is bad input."""
        prepared: dict[str, LabelledInput] = {}
        for metric in self.registry.matrix_components(name, "metrics"):
            for i, set_name in enumerate(getattr(metric.params, "labelled_sets", ())):
                where = f"metrics.{metric.name}.params.labelled_sets[{i}]"
                file = self.registry.origins.get(f"metrics.{metric.name}", "registry")
                if set_name in prepared:
                    continue
                entry: Resolved[LabelledSet] = self.registry.component("labelled_sets", set_name)
                try:
                    texts = returned(
                        entry.component.load(entry.params), LabelledTexts, entry.name, "LabelledSet", "load"
                    )
                except MissingDataPackage as exc:
                    raise RegistryError(file, where, f"labelled set {set_name!r}: {exc}") from None
                params = entry.params
                prepared[set_name] = prepare_labelled(
                    texts, loaded.tokenizer, params.max_tokens, params.test_fraction, params.split_seed
                )
        return prepared

    def _check_loaded_widths(
        self, matrix: Matrix, model: str, module: torch.nn.Module, hooks: list[HookPoint], device: torch.device
    ) -> None:
        """A loaded SAE reads activations as wide as the model's at its hook, known only now (a one-token pass)."""
        sources, name = matrix.entry.sources, matrix.name
        refs = [(i, self.registry.loaded_sae(name, s)) for i, s in enumerate(sources) if s.startswith("loaded:")]
        if not refs:
            return
        widths = capture(module, torch.zeros((1, 1), dtype=torch.long, device=device), hooks)
        for i, ref in refs:
            assert ref is not None
            for hook, x in widths.items():
                if x.shape[-1] != ref.file.d_in:
                    message = f"{ref.source} reads {ref.file.d_in}-wide activations; model {model!r} has {x.shape[-1]}"
                    raise self._bad_input(matrix, f"matrices.{name}.sources[{i}]", f"{message} at {hook}")

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


@dataclass
class Session:
    """One loaded and checked model of a matrix with its artifacts; M_c states are built lazily, once."""

    matrix: Matrix
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
