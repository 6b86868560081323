"""The artifacts of one model's part of a matrix run, each computed once: M and its compressed versions (an
M_c is built only when something not yet cached needs it), activations per (model, split, hook), SAEs
(trained, pruned, loaded) with their cache key and cost, and the scored model's next-token loss.

Every artifact is memoised in memory and cached on disk under a key that hashes the resolved identity of
everything that determines it (``Resolved.identity()``: plugin and params with defaults filled in). Nothing
here knows about cells or the results store (``harness/run.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from saex.activations import ShardedActivations, collect_activations
from saex.cache import Cache, cache_key
from saex.compressed import compress_verified
from saex.corpus import TokenBlocks
from saex.hookpoints import HookPoint
from saex.language_model import next_token_loss
from saex.protocols import CompressionContext, Compressor, LoadedModel, SAEArchitecture, SAEPruner
from saex.registry import MatrixEntry, Resolved
from saex.sae import SAE, load_sae, save_sae
from saex.sae_sparsity import sae_sparsity
from saex.saelens import load_pretrained
from saex.sources import Source
from saex.training import train_sae

SAE_VERSION = 1


@dataclass
class ModelState:
    """One model under evaluation (M or one M_c) and what was computed from it."""

    identity: dict  # what determines its weights: base fingerprint + resolved compression
    build: Callable[[ModelState], nn.Module]
    label: str = "M"
    details: dict = field(default_factory=dict)  # the compression's per-layer report
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


@dataclass
class Setting:
    """What every artifact of one model shares: the matrix, the loaded model, its token splits, the hooks."""

    matrix: MatrixEntry
    loaded: LoadedModel
    blocks: TokenBlocks
    hooks: list[HookPoint]
    device: torch.device


def trained_sae_key(acts: ShardedActivations, sae: Resolved[SAEArchitecture], seed: int) -> str:
    return cache_key({"acts": acts.path.name, "sae": sae.identity(), "seed": seed, "version": SAE_VERSION})


def pruned_sae_key(original: str, pruner: Resolved[SAEPruner], sparsity: float, calibration: ShardedActivations) -> str:
    return cache_key(
        {"sae": original, "pruner": pruner.identity(), "sparsity": sparsity, "calibration": calibration.path.name}
    )


class Artifacts:
    def __init__(
        self,
        cache: Cache,
        setting: Setting,
        architectures: Mapping[str, SAEArchitecture],
        *,
        progress: bool = True,
        log: Callable[[str], None] = print,
    ):
        self.cache, self.setting, self.architectures, self.progress, self.log = (
            cache,
            setting,
            architectures,
            progress,
            log,
        )
        loaded = setting.loaded
        self.base = ModelState({"model": loaded.fingerprint, "dtype": setting.matrix.dtype}, lambda _: loaded.model)
        self._saes: dict[str, SAEArtifact] = {}

    # --- models -------------------------------------------------------------------------------------------

    def compressed(self, compression: Resolved[Compressor]) -> ModelState:
        """M_c as a lazily built state. A compression that promises an unchanged model (``none``) shares M's
        cache identity, so its activations and SAEs are M's (the promise is verified when it runs)."""
        identity = (
            self.base.identity
            if self._unchanged(compression)
            else {
                **self.base.identity,
                "compression": compression.identity(),
            }
        )
        return ModelState(identity, lambda state: self._compress(compression, state), label=f"M_c[{compression.name}]")

    def _unchanged(self, compression: Resolved[Compressor]) -> bool:
        try:
            return compression.component.expectation(self.base.model, compression.params).unchanged
        except Exception:  # a bad parameter fails this compression's cells later, with its own message
            return False

    def _compress(self, compression: Resolved[Compressor], state: ModelState) -> nn.Module:
        """Build M_c, recording its per-layer report in ``state.details`` even when verification fails."""
        s = self.setting
        self.log(f"compressing with {compression.name} ({compression.entry.plugin})")
        calibration = CompressionContext(s.blocks.calibration, s.loaded.tokenizer, s.device, s.matrix.seed)
        try:
            compressed = compress_verified(
                self.cache,
                self.base.model,
                self.base.identity,
                compression.name,
                compression.component,
                compression.params,
                calibration,
                s.blocks.key,
                allow_mismatch=compression.entry.allow_mismatch,
            )
        except Exception as exc:  # every cell of this compression fails with the same message
            state.details = getattr(exc, "details", {"compression": compression.name})
            state.error = f"compression {compression.name!r} failed: {type(exc).__name__}: {exc}"
            self.log(state.error)
            raise
        state.details = compressed.details
        return compressed.model

    # --- activations and model loss ---------------------------------------------------------------------------

    def activations(self, state: ModelState, split: str, hook: HookPoint) -> ShardedActivations:
        """``state``'s activations at ``hook`` on ``split``; one model pass collects every hook of the matrix."""
        if (split, str(hook)) not in state.acts:
            s = self.setting
            parts = {**state.identity, "tokens": s.blocks.key, "split": split}
            found = collect_activations(
                self.cache,
                lambda: state.model,
                s.loaded.tokenizer,
                s.blocks.split(split),
                s.hooks,
                parts,
                device=s.device,
                desc=f"activations {state.label} {split}",
                progress=self.progress,
            )
            for h, acts in found.items():
                state.acts[(split, str(h))] = acts
        return state.acts[(split, str(hook))]

    def model_loss(self, state: ModelState) -> dict[str, float]:
        """Next-token loss and perplexity of ``state`` on the eval split (the same tokens for every cell)."""
        if state.lm is None:
            s = self.setting
            key = cache_key({**state.identity, "tokens": s.blocks.key, "what": "next_token_loss"})
            if self.cache.get("lm", key) is None:
                self.cache.put(
                    "lm",
                    key,
                    lambda tmp: next_token_loss(
                        state.model, s.blocks.eval, s.loaded.tokenizer, device=s.device, progress=self.progress
                    ),
                )
            state.lm = self.cache.meta("lm", key)
        return {"model_ce": state.lm["ce"], "model_ppl": state.lm["ppl"]}

    # --- SAEs -----------------------------------------------------------------------------------------------

    def sae(
        self,
        source: Source,
        sae: Resolved[SAEArchitecture],
        target: ModelState,
        hook: HookPoint,
        pruner: Resolved[SAEPruner] | None = None,
    ) -> SAEArtifact:
        """The SAE of ``source`` for a cell scored on ``target`` (``pruner`` for ``pruned:`` sources)."""
        if source.kind == "loaded":
            return self.loaded(Path(source.path).expanduser())
        if source.kind == "pruned":
            assert pruner is not None and source.sparsity is not None
            return self.pruned(sae, pruner, source.sparsity, target, hook)
        return self.trained(sae, self.base if source.kind == "original" else target, hook)

    def loaded(self, path: Path) -> SAEArtifact:
        start = time.perf_counter()
        sae = load_pretrained(path, self.architectures).to(self.setting.device).eval()
        return SAEArtifact(sae, {"sae_seconds": time.perf_counter() - start, "sae_tokens": 0}, "")

    def trained(self, sae: Resolved[SAEArchitecture], on: ModelState, hook: HookPoint) -> SAEArtifact:
        """An SAE of ``sae`` trained on ``on``'s activations at ``hook`` (``original`` when ``on`` is M)."""
        s = self.setting
        acts = self.activations(on, "train", hook)
        key = trained_sae_key(acts, sae, s.matrix.seed)
        if key in self._saes:
            return self._saes[key]
        if self.cache.get("saes", key) is None:

            def write(tmp: Path) -> dict:
                model = sae.component.build(acts.d_in, sae.params, seed=s.matrix.seed)
                result = train_sae(
                    model,
                    acts,
                    sae.entry.training,
                    device=s.device,
                    progress=self.progress,
                    checkpoint_dir=self.cache.root / "checkpoints" / key,
                )
                save_sae(model, tmp)
                final = {f"train_{k}": v for k, v in result.final.items()}
                return {"seconds": result.seconds, "tokens": result.tokens, "steps": result.steps, **final}

            self.cache.put("saes", key, write)
        meta = self.cache.meta("saes", key)
        cost = {"sae_seconds": meta["seconds"], "sae_tokens": meta["tokens"], **_activation_cost(acts)}
        return self._remember(SAEArtifact(self._load(key), cost, key))

    def pruned(
        self,
        sae: Resolved[SAEArchitecture],
        pruner: Resolved[SAEPruner],
        sparsity: float,
        target: ModelState,
        hook: HookPoint,
    ) -> SAEArtifact:
        """The original SAE pruned by ``pruner`` at ``sparsity``, calibrated on ``target``'s calibration split."""
        original = self.trained(sae, self.base, hook)
        calibration = self.activations(target, "calibration", hook)
        key = pruned_sae_key(original.key, pruner, sparsity, calibration)
        if key in self._saes:
            return self._saes[key]
        if self.cache.get("saes", key) is None:

            def write(tmp: Path) -> dict:
                start = time.perf_counter()
                pruned = pruner.component.prune(original.sae, pruner.params, calibration, sparsity)
                seconds = time.perf_counter() - start
                save_sae(pruned, tmp)
                achieved = sae_sparsity(pruned, reference=original.sae)
                return {"seconds": seconds, "tokens": calibration.n_tokens, "achieved": achieved}

            self.cache.put("saes", key, write)
        meta = self.cache.meta("saes", key)
        cost = {
            "sae_seconds": meta["seconds"],
            "sae_tokens": meta["tokens"],
            "prune_seconds": meta["seconds"],
            "calibration_tokens": meta["tokens"],
            "original_sae_seconds": original.cost["sae_seconds"],
            **_activation_cost(calibration),
        }
        details = {
            "pruning": {
                "pruner": pruner.name,
                "plugin": pruner.entry.plugin,
                "sparsity": sparsity,
                "achieved": meta["achieved"],
            }
        }
        return self._remember(SAEArtifact(self._load(key), cost, key, details))

    def _load(self, key: str) -> SAE:
        return load_sae(self.cache.dir("saes", key), self.architectures).to(self.setting.device).eval()

    def _remember(self, artifact: SAEArtifact) -> SAEArtifact:
        self._saes[artifact.key] = artifact
        return artifact


def _activation_cost(acts: ShardedActivations) -> dict[str, float]:
    """Seconds of the model pass that collected the activations an SAE was trained or calibrated on."""
    return {} if acts.seconds is None else {"activation_seconds": acts.seconds}
