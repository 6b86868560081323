"""The local executor: turns a matrix into results rows, computing each artifact once.

Per model: load M, pack the token splits, collect M's activations (cached), train or load the ``original``
SAE (cached), then per compression: compress a copy of M, verify it layer by layer, collect M_c's
activations and train the ``retrained`` SAE. Every SAE scored on a given model reads the same eval
activations. A failing cell is recorded as failed with its error; the others go on.
"""

from __future__ import annotations

import copy
import platform
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import transformers
from torch import nn

import harness
from harness.activations import ShardedActivations, collect_activations
from harness.cache import Cache, cache_key
from harness.corpus import TokenBlocks, token_blocks
from harness.hookpoints import HookPoint, check_hook, parse_hook
from harness.matrix import BASE, Cell, expand
from harness.models import resolve_device
from harness.plugins import Plugins
from harness.protocols import CompressionContext, LoadedModel, MetricContext
from harness.registry import MatrixEntry, Registry
from harness.sae import SAE, load_sae, save_sae
from harness.store import CellResult, ResultsStore
from harness.training import train_sae
from harness.verify import CompressionMismatch, clone_weights, linear_layers, verify

SAE_VERSION = 1


def versions() -> dict[str, str]:
    return {"saex": harness.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


@dataclass
class ModelState:
    """One model under evaluation (M or one M_c) and what was computed from it."""

    model: nn.Module
    identity: dict  # what determines its weights: base fingerprint + compression entry
    details: dict = field(default_factory=dict)
    error: str | None = None
    acts: dict[tuple[str, str], ShardedActivations] = field(default_factory=dict)  # (split, hook) -> acts


@dataclass
class SAEArtifact:
    sae: SAE
    cost: dict[str, float]


class Runner:
    def __init__(self, plugins: Plugins, registry: Registry, store: ResultsStore, cache: Cache,
                 *, device: str | None = None, progress: bool = True, log: Callable[[str], None] = print):
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
                self._run_model(matrix, model_name, todo, device)
        return [r for c in cells if (r := self.store.get(c.key(self.registry))) is not None]

    # --- per model ----------------------------------------------------------------------------------------

    def _run_model(self, matrix: MatrixEntry, model_name: str, cells: list[Cell], device: torch.device) -> None:
        entry = self.registry.models[model_name]
        loaded: LoadedModel = self.plugins.get("model", entry.plugin).load(
            self.registry.params("models", model_name, self.plugins), device)
        if matrix.dtype == "bfloat16":
            loaded.model.to(torch.bfloat16)
        hooks = [parse_hook(h) for h in matrix.hooks]
        for hook in hooks:
            check_hook(loaded.model, hook)
        blocks = self._blocks(matrix, loaded)
        base = ModelState(loaded.model, {"model": loaded.fingerprint, "dtype": matrix.dtype})
        ctx = _Context(matrix, loaded, blocks, hooks, device)
        for cell in [c for c in cells if c.scored_on == BASE]:
            self._run_cell(cell, ctx, base, base)
        for compression in matrix.compressions:
            todo = [c for c in cells if c.compression == compression]
            if todo:
                compressed = self._compress(ctx, base, compression)
                for cell in todo:
                    self._run_cell(cell, ctx, base, compressed)
                del compressed

    def _blocks(self, matrix: MatrixEntry, loaded: LoadedModel) -> TokenBlocks:
        entry = self.registry.corpora[matrix.corpus]
        corpus = self.plugins.get("corpus", entry.plugin)
        params = self.registry.params("corpora", matrix.corpus, self.plugins)
        return token_blocks(self.cache, lambda: corpus.documents(params), corpus.fingerprint(params),
                            loaded.tokenizer, matrix.block_size, matrix.tokens.model_dump())

    def _compress(self, ctx: "_Context", base: ModelState, name: str) -> ModelState:
        entry = self.registry.compressions[name]
        compressor = self.plugins.get("compression", entry.plugin)
        params = self.registry.params("compressions", name, self.plugins)
        identity = {**base.identity, "compression": entry.model_dump()}
        self.log(f"compressing with {name} ({entry.plugin})")
        state = ModelState(base.model, identity)
        try:
            model = copy.deepcopy(base.model)
            expectation = compressor.expectation(model, params)
            names = expectation.targets or list(linear_layers(model))
            originals = clone_weights(model, names)
            start = time.perf_counter()
            model = compressor.compress(model, params, CompressionContext(
                ctx.blocks.calibration, ctx.loaded.tokenizer, ctx.device, ctx.matrix.seed))
            state.model = model
            state.details = {"compression": name, "seconds": time.perf_counter() - start}
            try:
                report = verify(model, names, expectation, originals, allow_mismatch=entry.allow_mismatch)
            except CompressionMismatch as exc:
                state.details["layers"] = [r.model_dump() for r in exc.report]
                raise
            state.details["layers"] = [r.model_dump() for r in report]
        except Exception as exc:  # every cell of this compression fails with the same message
            state.error = f"compression {name!r} failed: {type(exc).__name__}: {exc}"
            self.log(state.error)
        return state

    # --- per cell -------------------------------------------------------------------------------------------

    def _run_cell(self, cell: Cell, ctx: "_Context", base: ModelState, target: ModelState) -> None:
        key, config = cell.key(self.registry), cell.config(self.registry)
        self.store.start(key, cell.matrix, config["cell"], config)
        self.plugins.manager.hook.cell_started(cell=cell)
        self.log(f"cell {cell.label}")
        result = CellResult(key, cell.matrix, config["cell"], "running", versions=versions(), config=config)
        if target.details:
            result.details["compression"] = target.details
        try:
            if target.error:
                raise RuntimeError(target.error)
            hook = parse_hook(cell.hook)
            trained_on = base if cell.source == "original" else target
            artifact = self._sae(ctx, trained_on, cell.sae, hook)
            eval_acts = self._acts(ctx, target, "eval", hook)
            result.metrics = self._metrics(ctx, artifact.sae, eval_acts)
            result.cost = artifact.cost
            result.status = "done"
        except Exception as exc:
            result.status = "failed"
            result.error = f"{type(exc).__name__}: {exc}"
            result.details["traceback"] = traceback.format_exc(limit=8)
            self.log(f"  failed: {result.error}")
        self.store.finish(result)
        self.plugins.manager.hook.cell_finished(cell=cell, result=result)

    def _acts(self, ctx: "_Context", state: ModelState, split: str, hook: HookPoint) -> ShardedActivations:
        if (split, str(hook)) not in state.acts:
            parts = {**state.identity, "tokens": ctx.blocks.key, "split": split}
            label = "M" if "compression" not in state.identity else "M_c"
            found = collect_activations(self.cache, state.model, ctx.loaded.tokenizer, ctx.blocks.split(split),
                                        ctx.hooks, parts, device=ctx.device, desc=f"activations {label} {split}",
                                        progress=self.progress)
            for h, acts in found.items():
                state.acts[(split, str(h))] = acts
        return state.acts[(split, str(hook))]

    def _sae(self, ctx: "_Context", trained_on: ModelState, sae_name: str, hook: HookPoint) -> SAEArtifact:
        entry = self.registry.saes[sae_name]
        arch = self.plugins.get("sae", entry.plugin)
        acts = self._acts(ctx, trained_on, "train", hook)
        key = cache_key({"acts": str(acts.path.name), "sae": entry.model_dump(), "seed": ctx.matrix.seed,
                         "version": SAE_VERSION})
        architectures = {n: self.plugins.get("sae", n) for n in self.plugins.names("sae")}
        path = self.cache.get("saes", key)
        if path is None:
            def write(tmp: Path) -> dict:
                sae = arch.build(acts.d_in, self.registry.params("saes", sae_name, self.plugins), seed=ctx.matrix.seed)
                result = train_sae(sae, acts, entry.training, device=ctx.device, progress=self.progress)
                save_sae(sae, tmp)
                return {"seconds": result.seconds, "tokens": result.tokens, "steps": result.steps, **{
                    f"train_{k}": v for k, v in result.final.items()}}
            path = self.cache.put("saes", key, write)
        meta = self.cache.meta("saes", key)
        sae = load_sae(path, architectures).to(ctx.device).eval()
        return SAEArtifact(sae, {"sae_seconds": meta["seconds"], "sae_tokens": meta["tokens"]})

    def _metrics(self, ctx: "_Context", sae: SAE, acts: ShardedActivations) -> dict[str, float]:
        values: dict[str, float] = {}
        mctx = MetricContext(sae, acts, ctx.device)
        for name in ctx.matrix.metrics:
            entry = self.registry.metrics[name]
            metric = self.plugins.get("metric", entry.plugin)
            for k, v in metric.compute(mctx, self.registry.params("metrics", name, self.plugins)).items():
                if k in values:
                    raise ValueError(f"metric {name!r} returns {k!r}, already returned by another metric")
                values[k] = float(v)
        return values


@dataclass
class _Context:
    matrix: MatrixEntry
    loaded: LoadedModel
    blocks: TokenBlocks
    hooks: list[HookPoint]
    device: torch.device
