"""The local executor: turns a matrix into results rows, computing each artifact once.

Per model: load M, pack the token splits, collect M's activations (cached), train or load the ``original``
SAE (cached), then per compression: compress a copy of M, verify it layer by layer, collect M_c's
activations and train the ``retrained`` SAE. Every SAE scored on a given model reads the same eval
activations. A failing cell is recorded as failed with its error; the others go on.
"""

from __future__ import annotations

import platform
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from pydantic import BaseModel
from torch import nn

import saex
from saex.activations import ShardedActivations, collect_activations
from saex.cache import Cache, cache_key
from saex.compressed import compress_verified
from saex.corpus import TokenBlocks, token_blocks
from saex.hookpoints import HookPoint, check_hook, parse_hook
from saex.language_model import next_token_loss
from saex.manager import Plugins
from saex.matrix import BASE, Cell, expand
from saex.models import resolve_device
from saex.protocols import CompressionContext, LoadedModel, Metric, MetricContext, SAEArchitecture, SpliceContext
from saex.registry import MatrixEntry, Registry, RegistryError
from saex.sae import SAE, load_sae, mean_activation, save_sae
from saex.sae_sparsity import sae_sparsity
from saex.saelens import load_pretrained
from saex.sources import Source, parse_source
from saex.store import CellResult, ResultsStore
from saex.training import train_sae

SAE_VERSION = 1


def versions() -> dict[str, str]:
    return {
        "saex": saex.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


@dataclass
class ModelState:
    """One model under evaluation (M or one M_c) and what was computed from it. An M_c is only built when
    something not yet cached needs it (``build``), so a resumed run with cached activations compresses nothing.
    """

    identity: dict  # what determines its weights: base fingerprint + compression entry
    build: Callable[["ModelState"], nn.Module]
    label: str = "M"
    details: dict = field(default_factory=dict)
    error: str | None = None
    acts: dict[tuple[str, str], ShardedActivations] = field(default_factory=dict)  # (split, hook) -> acts
    lm: dict[str, float] | None = None  # next-token loss on the eval split
    _model: nn.Module | None = None

    @property
    def model(self) -> nn.Module:
        if self.error:
            raise RuntimeError(self.error)
        if self._model is None:
            self._model = self.build(self)
        return self._model

    def release(self) -> None:
        """Drop the model (not what was computed from it) once its cells are scored."""
        self._model = None


@dataclass
class SAEArtifact:
    sae: SAE
    cost: dict[str, float]
    key: str  # cache key ("" for SAEs loaded from a user's path)
    details: dict = field(default_factory=dict)


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

    # --- entry point ------------------------------------------------------------------------------------

    def run(self, name: str) -> list[CellResult]:
        matrix = self.registry.matrix(name)
        cells = expand(name, matrix)
        pending = [c for c in cells if self.store.status(c.key(self.registry)) != "done"]
        self.log(f"matrix {name}: {len(cells)} cells, {len(cells) - len(pending)} already done, {len(pending)} to run")
        device = resolve_device(self.device_override or matrix.device)
        for model_name in matrix.models:
            todo = [c for c in pending if c.model == model_name]
            if todo:
                self._run_model(name, matrix, model_name, todo, device)
        return [r for c in cells if (r := self.store.get(c.key(self.registry))) is not None]

    # --- per model ----------------------------------------------------------------------------------------

    def _run_model(
        self, name: str, matrix: MatrixEntry, model_name: str, cells: list[Cell], device: torch.device
    ) -> None:
        entry = self.registry.models[model_name]
        loaded: LoadedModel = self.plugins.get("model", entry.plugin).load(
            self.registry.params("models", model_name, self.plugins), device
        )
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
                    f"model {model_name!r}: {exc}",
                ) from exc
        blocks = self._blocks(matrix, loaded)
        base = ModelState({"model": loaded.fingerprint, "dtype": matrix.dtype}, lambda state: loaded.model)
        ctx = _Context(matrix, loaded, blocks, hooks, device)
        groups: list[tuple[ModelState, list[Cell]]] = [(base, [c for c in cells if c.scored_on == BASE])]
        for compression in matrix.compressions:
            todo = [c for c in cells if c.compression == compression]
            if todo:
                groups.append((self._compressed_state(ctx, base, compression), todo))
        for target, todo in groups:
            for hook in hooks:
                group = [c for c in todo if c.hook == str(hook)]
                if group:
                    self._score_group(group, ctx, base, target, hook)
            if target is not base:
                target.release()

    def _blocks(self, matrix: MatrixEntry, loaded: LoadedModel) -> TokenBlocks:
        entry = self.registry.corpora[matrix.corpus]
        corpus = self.plugins.get("corpus", entry.plugin)
        params = self.registry.params("corpora", matrix.corpus, self.plugins)
        return token_blocks(
            self.cache,
            lambda: corpus.documents(params),
            corpus.fingerprint(params),
            loaded.tokenizer,
            matrix.block_size,
            matrix.tokens.model_dump(),
            progress=self.progress,
        )

    def _compressed_state(self, ctx: "_Context", base: ModelState, name: str) -> ModelState:
        entry = self.registry.compressions[name]
        unchanged = self._promises_unchanged(base, name)
        identity = base.identity if unchanged else {**base.identity, "compression": entry.model_dump()}
        return ModelState(identity, lambda state: self._compress(ctx, base, name, state), label=f"M_c[{name}]")

    def _promises_unchanged(self, base: ModelState, name: str) -> bool:
        """Whether compression ``name`` promises to return M as it was (``none``): then M_c shares M's cache
        keys, so its activations and its `retrained` SAE are M's (the promise is verified when it runs)."""
        entry = self.registry.compressions[name]
        try:
            compressor = self.plugins.get("compression", entry.plugin)
            return compressor.expectation(
                base.model, self.registry.params("compressions", name, self.plugins)
            ).unchanged
        except Exception:  # a bad parameter fails this compression's cells later, with its own message
            return False

    def _compress(self, ctx: "_Context", base: ModelState, name: str, state: ModelState) -> nn.Module:
        """Build M_c, recording its per-layer report in ``state.details`` even when verification fails."""
        entry = self.registry.compressions[name]
        self.log(f"compressing with {name} ({entry.plugin})")
        calibration = CompressionContext(ctx.blocks.calibration, ctx.loaded.tokenizer, ctx.device, ctx.matrix.seed)
        try:
            compressed = compress_verified(
                self.cache,
                base.model,
                base.identity,
                name,
                self.plugins.get("compression", entry.plugin),
                self.registry.params("compressions", name, self.plugins),
                calibration,
                ctx.blocks.key,
                allow_mismatch=entry.allow_mismatch,
            )
        except Exception as exc:  # every cell of this compression fails with the same message
            state.details = getattr(exc, "details", {"compression": name})
            state.error = f"compression {name!r} failed: {type(exc).__name__}: {exc}"
            self.log(state.error)
            raise
        state.details = compressed.details
        return compressed.model

    # --- per cell -------------------------------------------------------------------------------------------

    def _score_group(
        self, cells: list[Cell], ctx: "_Context", base: ModelState, target: ModelState, hook: HookPoint
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
                artifact = self._sae(ctx, parse_source(cell.source), base, target, cell.sae, hook)
                result.cost, result.details = artifact.cost, artifact.details
                result.metrics = {
                    **self._sae_metrics(ctx, cell, artifact.sae, base, target, hook),
                    **self._lm_metrics(ctx, target),
                }
                saes[cell] = artifact.sae
            except Exception as exc:
                _fail(result, exc, self.log)
        if saes:
            try:
                for cell, values in self._splice_metrics(ctx, target, hook, saes).items():
                    running[cell].metrics.update(values)
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

    def _acts(self, ctx: "_Context", state: ModelState, split: str, hook: HookPoint) -> ShardedActivations:
        if (split, str(hook)) not in state.acts:
            parts = {**state.identity, "tokens": ctx.blocks.key, "split": split}
            found = collect_activations(
                self.cache,
                lambda: state.model,
                ctx.loaded.tokenizer,
                ctx.blocks.split(split),
                ctx.hooks,
                parts,
                device=ctx.device,
                desc=f"activations {state.label} {split}",
                progress=self.progress,
            )
            for h, acts in found.items():
                state.acts[(split, str(h))] = acts
        return state.acts[(split, str(hook))]

    def _architectures(self) -> dict[str, SAEArchitecture]:
        return {n: self.plugins.get("sae", n) for n in self.plugins.names("sae")}

    def _sae(
        self, ctx: "_Context", source: Source, base: ModelState, target: ModelState, sae_name: str, hook: HookPoint
    ) -> SAEArtifact:
        if source.kind == "loaded":
            start = time.perf_counter()
            sae = load_pretrained(Path(source.path).expanduser(), self._architectures()).to(ctx.device).eval()
            return SAEArtifact(sae, {"sae_seconds": time.perf_counter() - start, "sae_tokens": 0}, "")
        if source.kind == "pruned":
            return self._pruned_sae(ctx, source, base, target, sae_name, hook)
        return self._trained_sae(ctx, base if source.kind == "original" else target, sae_name, hook)

    def _trained_sae(self, ctx: "_Context", trained_on: ModelState, sae_name: str, hook: HookPoint) -> SAEArtifact:
        entry = self.registry.saes[sae_name]
        arch = self.plugins.get("sae", entry.plugin)
        acts = self._acts(ctx, trained_on, "train", hook)
        key = cache_key(
            {"acts": acts.path.name, "sae": entry.model_dump(), "seed": ctx.matrix.seed, "version": SAE_VERSION}
        )
        if self.cache.get("saes", key) is None:

            def write(tmp: Path) -> dict:
                sae = arch.build(acts.d_in, self.registry.params("saes", sae_name, self.plugins), seed=ctx.matrix.seed)
                result = train_sae(
                    sae,
                    acts,
                    entry.training,
                    device=ctx.device,
                    progress=self.progress,
                    checkpoint_dir=self.cache.root / "checkpoints" / key,
                )
                save_sae(sae, tmp)
                return {
                    "seconds": result.seconds,
                    "tokens": result.tokens,
                    "steps": result.steps,
                    **{f"train_{k}": v for k, v in result.final.items()},
                }

            self.cache.put("saes", key, write)
        meta = self.cache.meta("saes", key)
        sae = load_sae(self.cache.dir("saes", key), self._architectures()).to(ctx.device).eval()
        return SAEArtifact(
            sae, {"sae_seconds": meta["seconds"], "sae_tokens": meta["tokens"], **_activation_cost(acts)}, key
        )

    def _pruned_sae(
        self, ctx: "_Context", source: Source, base: ModelState, target: ModelState, sae_name: str, hook: HookPoint
    ) -> SAEArtifact:
        """The original SAE pruned with ``source.strategy`` at ``source.sparsity``, calibrated on the scored
        (compressed) model's calibration split."""
        original = self._trained_sae(ctx, base, sae_name, hook)
        pruner = self.plugins.get("pruner", source.strategy)
        params = pruner.Params()
        calibration = self._acts(ctx, target, "calibration", hook)
        key = cache_key(
            {
                "sae": original.key,
                "strategy": source.strategy,
                "params": params.model_dump(mode="json"),
                "sparsity": source.sparsity,
                "calibration": calibration.path.name,
            }
        )
        if self.cache.get("saes", key) is None:

            def write(tmp: Path) -> dict:
                start = time.perf_counter()
                pruned = pruner.prune(original.sae, params, calibration, source.sparsity)
                seconds = time.perf_counter() - start
                save_sae(pruned, tmp)
                return {
                    "seconds": seconds,
                    "tokens": calibration.n_tokens,
                    "achieved": sae_sparsity(pruned, reference=original.sae),
                }

            self.cache.put("saes", key, write)
        meta = self.cache.meta("saes", key)
        sae = load_sae(self.cache.dir("saes", key), self._architectures()).to(ctx.device).eval()
        cost = {
            "sae_seconds": meta["seconds"],
            "sae_tokens": meta["tokens"],
            "prune_seconds": meta["seconds"],
            "calibration_tokens": meta["tokens"],
            "original_sae_seconds": original.cost["sae_seconds"],
            **_activation_cost(calibration),
        }
        details = {"pruning": {"strategy": source.strategy, "sparsity": source.sparsity, "achieved": meta["achieved"]}}
        return SAEArtifact(sae, cost, key, details)

    def _sae_metrics(
        self, ctx: "_Context", cell: Cell, sae: SAE, base: ModelState, target: ModelState, hook: HookPoint
    ) -> dict[str, float]:
        reference_acts = self._acts(ctx, base, "eval", hook) if target is not base else None
        reference_sae = None
        if parse_source(cell.source).kind in ("retrained", "pruned"):
            reference_sae = self._trained_sae(ctx, base, cell.sae, hook).sae
        mctx = MetricContext(
            sae,
            self._acts(ctx, target, "eval", hook),
            ctx.device,
            reference_activations=reference_acts,
            reference_sae=reference_sae,
        )
        values: dict[str, float] = {}
        for name, metric, params in self._metric_plugins(ctx, "sae"):
            _merge(values, metric.compute(mctx, params), name)
        return values

    def _splice_metrics(
        self, ctx: "_Context", target: ModelState, hook: HookPoint, saes: dict[Cell, SAE]
    ) -> dict[Cell, dict[str, float]]:
        plugins = self._metric_plugins(ctx, "splice")
        if not plugins:
            return {}
        by_label = {f"{c.sae}/{c.source}": c for c in saes}  # unique within a (scored model, hook) group
        sctx = SpliceContext(
            target.model,
            hook,
            ctx.blocks.eval,
            ctx.loaded.tokenizer,
            ctx.device,
            {label: saes[c] for label, c in by_label.items()},
            mean_activation=mean_activation(self._acts(ctx, target, "eval", hook)).float(),
        )
        values: dict[Cell, dict[str, float]] = {c: {} for c in saes}
        for name, metric, params in plugins:
            for label, found in metric.compute_spliced(sctx, params).items():
                _merge(values[by_label[label]], found, name)
        return values

    def _metric_plugins(self, ctx: "_Context", scope: str) -> list[tuple[str, Metric, BaseModel]]:
        chosen = []
        for name in ctx.matrix.metrics:
            metric = self.plugins.get("metric", self.registry.metrics[name].plugin)
            if getattr(metric, "scope", "sae") == scope:
                chosen.append((name, metric, self.registry.params("metrics", name, self.plugins)))
        return chosen

    def _lm_metrics(self, ctx: "_Context", state: ModelState) -> dict[str, float]:
        """Next-token loss and perplexity of the scored model on the eval split (same tokens for every cell)."""
        if state.lm is None:
            key = cache_key({**state.identity, "tokens": ctx.blocks.key, "what": "next_token_loss"})
            if self.cache.get("lm", key) is None:
                self.cache.put(
                    "lm",
                    key,
                    lambda tmp: next_token_loss(
                        state.model, ctx.blocks.eval, ctx.loaded.tokenizer, device=ctx.device, progress=self.progress
                    ),
                )
            state.lm = self.cache.meta("lm", key)
        return {"model_ce": state.lm["ce"], "model_ppl": state.lm["ppl"]}


def _activation_cost(acts: ShardedActivations) -> dict[str, float]:
    """Seconds of the model pass that collected the activations an SAE was trained or calibrated on."""
    return {} if acts.seconds is None else {"activation_seconds": acts.seconds}


def _merge(values: dict[str, float], found: dict[str, float], metric: str) -> None:
    for k, v in found.items():
        if k in values:
            raise ValueError(f"metric {metric!r} returns {k!r}, already returned by another metric")
        values[k] = float(v)


def _fail(result: CellResult, exc: Exception, log: Callable[[str], None]) -> None:
    result.status = "failed"
    result.error = f"{type(exc).__name__}: {exc}"
    result.details["traceback"] = traceback.format_exc(limit=8)
    log(f"  failed: {result.error}")


@dataclass
class _Context:
    matrix: MatrixEntry
    loaded: LoadedModel
    blocks: TokenBlocks
    hooks: list[HookPoint]
    device: torch.device
