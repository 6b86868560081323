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
from harness.compressed import compress_verified
from harness.language_model import next_token_loss

SAE_VERSION = 1


def versions() -> dict[str, str]:
    return {"saex": harness.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


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
        if self._model is None:
            self._model = self.build(self)
        return self._model


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
        base = ModelState({"model": loaded.fingerprint, "dtype": matrix.dtype}, lambda state: loaded.model)
        ctx = _Context(matrix, loaded, blocks, hooks, device)
        for cell in [c for c in cells if c.scored_on == BASE]:
            self._run_cell(cell, ctx, base, base)
        for compression in matrix.compressions:
            todo = [c for c in cells if c.compression == compression]
            if todo:
                compressed = self._compressed_state(ctx, base, compression)
                for cell in todo:
                    self._run_cell(cell, ctx, base, compressed)
                del compressed

    def _blocks(self, matrix: MatrixEntry, loaded: LoadedModel) -> TokenBlocks:
        entry = self.registry.corpora[matrix.corpus]
        corpus = self.plugins.get("corpus", entry.plugin)
        params = self.registry.params("corpora", matrix.corpus, self.plugins)
        return token_blocks(self.cache, lambda: corpus.documents(params), corpus.fingerprint(params),
                            loaded.tokenizer, matrix.block_size, matrix.tokens.model_dump())

    def _compressed_state(self, ctx: "_Context", base: ModelState, name: str) -> ModelState:
        entry = self.registry.compressions[name]
        identity = {**base.identity, "compression": entry.model_dump()}
        return ModelState(identity, lambda state: self._compress(ctx, base, name, state), label=f"M_c[{name}]")

    def _compress(self, ctx: "_Context", base: ModelState, name: str, state: ModelState) -> nn.Module:
        """Build M_c, recording its per-layer report in ``state.details`` even when verification fails."""
        entry = self.registry.compressions[name]
        self.log(f"compressing with {name} ({entry.plugin})")
        calibration = CompressionContext(ctx.blocks.calibration, ctx.loaded.tokenizer, ctx.device, ctx.matrix.seed)
        try:
            compressed = compress_verified(
                self.cache, base.model, base.identity, name, self.plugins.get("compression", entry.plugin),
                self.registry.params("compressions", name, self.plugins), calibration, ctx.blocks.key,
                allow_mismatch=entry.allow_mismatch)
        except Exception as exc:  # every cell of this compression fails with the same message
            state.details = getattr(exc, "details", {"compression": name})
            state.error = f"compression {name!r} failed: {type(exc).__name__}: {exc}"
            self.log(state.error)
            raise
        state.details = compressed.details
        return compressed.model

    # --- per cell -------------------------------------------------------------------------------------------

    def _run_cell(self, cell: Cell, ctx: "_Context", base: ModelState, target: ModelState) -> None:
        key, config = cell.key(self.registry), cell.config(self.registry)
        self.store.start(key, cell.matrix, config["cell"], config)
        self.plugins.manager.hook.cell_started(cell=cell)
        self.log(f"cell {cell.label}")
        result = CellResult(key, cell.matrix, config["cell"], "running", versions=versions(), config=config)
        try:
            if target.error:
                raise RuntimeError(target.error)
            hook = parse_hook(cell.hook)
            trained_on = base if cell.source == "original" else target
            artifact = self._sae(ctx, trained_on, cell.sae, hook)
            eval_acts = self._acts(ctx, target, "eval", hook)
            result.metrics = {**self._metrics(ctx, artifact.sae, eval_acts), **self._lm_metrics(ctx, target)}
            result.cost = artifact.cost
            result.status = "done"
        except Exception as exc:
            result.status = "failed"
            result.error = f"{type(exc).__name__}: {exc}"
            result.details["traceback"] = traceback.format_exc(limit=8)
            self.log(f"  failed: {result.error}")
        if target.details:
            result.details["compression"] = target.details
        self.store.finish(result)
        self.plugins.manager.hook.cell_finished(cell=cell, result=result)

    def _acts(self, ctx: "_Context", state: ModelState, split: str, hook: HookPoint) -> ShardedActivations:
        if (split, str(hook)) not in state.acts:
            parts = {**state.identity, "tokens": ctx.blocks.key, "split": split}
            found = collect_activations(self.cache, lambda: state.model, ctx.loaded.tokenizer, ctx.blocks.split(split),
                                        ctx.hooks, parts, device=ctx.device, desc=f"activations {state.label} {split}",
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

    def _lm_metrics(self, ctx: "_Context", state: ModelState) -> dict[str, float]:
        """Next-token loss and perplexity of the scored model on the eval split (same tokens for every cell)."""
        if state.lm is None:
            key = cache_key({**state.identity, "tokens": ctx.blocks.key, "what": "next_token_loss"})
            if self.cache.get("lm", key) is None:
                self.cache.put("lm", key, lambda tmp: next_token_loss(
                    state.model, ctx.blocks.eval, ctx.loaded.tokenizer, device=ctx.device, progress=self.progress))
            state.lm = self.cache.meta("lm", key)
        return {"model_ce": state.lm["ce"], "model_ppl": state.lm["ppl"]}

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
