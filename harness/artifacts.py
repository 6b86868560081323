"""The artifacts of one model's part of a matrix run, each computed once: M and its compressed versions (an
M_c is built only when something not yet cached needs it), activations per (model, split, hook), SAEs
(trained, fine-tuned, pruned, loaded) with their cache key and cost, and the scored model's next-token loss.

Every artifact is memoised in memory and cached on disk under a key that hashes the resolved identity of
everything that determines it (``Resolved.identity()``: plugin and params with defaults filled in). Nothing
here knows about cells or the results store (``harness/run.py``).

A loaded SAE (``loaded:``) takes the place of the trained original: ``pruned`` prunes it, ``finetuned`` trains it
further, and ``retrained`` trains the same SAE afresh on M_c (``mirrored``): the loaded SAE's architecture and the
params its files fix (width, k, ...; all of them for a file saex wrote), the params the matrix's ``saes`` entry
writes out for the rest when the entry is of that architecture (what only shapes training: loss weights,
``normalize_input``, ``b_dec_init``), and the entry's ``training``. A loaded SAE with a per-token layer norm is
retrained (and fine-tuned) on layer-normed activations, as OpenAI trained theirs, and keeps the norm.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ParamSpec, TypeVar

import torch
from torch import nn

from saex.activations import ShardedActivations, collect_activations
from saex.cache import Cache, cache_key
from saex.compressed import compress_verified
from saex.corpus import TokenBlocks
from saex.hookpoints import HookPoint
from saex.language_model import next_token_loss
from saex.precision import in_precision
from saex.pretrained import LoadedRef
from saex.protocols import ActivationSource, CompressionContext, Compressor, LoadedModel, SAEArchitecture, SAEPruner
from saex.registry import MatrixEntry, Resolved, SAEEntry
from saex.sae import SAE, layer_norm, load_sae, save_sae
from saex.sae_formats import load_pretrained
from saex.sae_sparsity import sae_sparsity
from saex.sources import Source
from saex.splice import Prefixes
from saex.training import TrainingConfig, train_sae

P = ParamSpec("P")
T = TypeVar("T")
SAE_VERSION = 2  # 2: saved SAEs carry the ``layer_norm`` buffer
WIDTH_PARAMS = ("d_sae", "expansion_factor")  # a retrained SAE keeps the loaded one's width
TRAINING_INIT = ("normalize_input", "b_dec_init")  # readers of foreign files set these only to describe them


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
    _prefixes: Prefixes | None = None

    @property
    def model(self) -> nn.Module:
        if self.error:
            raise RuntimeError(self.error)
        if self._model is None:
            self._model = self.build(self)
        return self._model

    @property
    def prefixes(self) -> Prefixes:
        """The model's prefix passes, shared by every hook group scored on it."""
        if self._prefixes is None:
            self._prefixes = Prefixes(self.model)
        return self._prefixes

    def release(self) -> None:
        """Drop the model and its prefix passes (not what was computed from them) once its cells are scored."""
        self._model = self._prefixes = None


@dataclass
class SAEArtifact:
    sae: SAE
    cost: dict[str, float]
    key: str  # cache key (for SAEs loaded from a user's files, a hash of their identity: nothing is cached)
    details: dict = field(default_factory=dict)


@dataclass
class Setting:
    """What every artifact of one model shares: the matrix, the loaded model, its token splits, the hooks."""

    matrix: MatrixEntry
    loaded: LoadedModel
    blocks: TokenBlocks
    hooks: list[HookPoint]
    device: torch.device


def trained_sae_key(acts: ShardedActivations, sae: Resolved[SAEArchitecture], seed: int, layer_norm: bool) -> str:
    parts = {"acts": acts.path.name, "sae": sae.identity(), "seed": seed, "version": SAE_VERSION}
    return cache_key(parts | {"layer_norm": True} if layer_norm else parts)


@dataclass
class LayerNormed:
    """Activations with each token layer-normed as ``SAE.normalise`` does: what an SAE with ``layer_norm`` is
    trained on (its ``training_loss`` sees normalised inputs, never the model's)."""

    acts: ActivationSource

    @property
    def d_in(self) -> int:
        return self.acts.d_in

    @property
    def n_tokens(self) -> int:
        return self.acts.n_tokens

    def iter_batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0) -> Iterator[torch.Tensor]:
        for batch in self.acts.iter_batches(batch_size, shuffle=shuffle, seed=seed):
            yield layer_norm(batch)[0]


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
        record: Callable[[str, float], None] = lambda phase, seconds: None,
    ):
        self.cache, self.setting, self.architectures, self.progress, self.log = (
            cache,
            setting,
            architectures,
            progress,
            log,
        )
        loaded = setting.loaded
        precision = setting.matrix.precision
        self.base = ModelState(
            {"model": loaded.fingerprint, "dtype": precision},
            lambda _: in_precision(loaded.model, precision, copy_first=True),
        )
        self._saes: dict[str, SAEArtifact] = {}
        self.record = record  # (phase, seconds) of each timed phase, for the store
        self._inner: list[float] = []  # seconds of phases nested in the open ones, so none is counted twice

    def timed_call(self, phase: str) -> Callable[[Callable[P, T]], Callable[P, T]]:
        """Decorator form of ``timed``: time every call of a function (e.g. a cache ``write`` that runs only
        when the artifact is missing)."""

        def wrap(fn: Callable[P, T]) -> Callable[P, T]:
            @functools.wraps(fn)
            def timed_fn(*args: P.args, **kwargs: P.kwargs) -> T:
                with self.timed(phase):
                    return fn(*args, **kwargs)

            return timed_fn

        return wrap

    @contextlib.contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Record the seconds spent in ``phase``, less those of phases timed inside it (a lazily built M_c
        inside a collection counts as compressing, not collecting)."""
        start = time.perf_counter()
        self._inner.append(0.0)
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            inner = self._inner.pop()
            if self._inner:
                self._inner[-1] += elapsed
            self.record(phase, elapsed - inner)

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
            return compression.component.expectation(self.setting.loaded.model, compression.params).unchanged
        except Exception:  # a bad parameter fails this compression's cells later, with its own message
            return False

    def _compress(self, compression: Resolved[Compressor], state: ModelState) -> nn.Module:
        """Build M_c, recording its per-layer report in ``state.details`` even when verification fails."""
        s = self.setting
        self.log(f"compressing with {compression.name} ({compression.entry.plugin})")
        calibration = CompressionContext(s.blocks.calibration, s.loaded.tokenizer, s.device, s.matrix.seed)
        try:
            with self.timed(f"compress {compression.name}"):
                compressed = compress_verified(
                    self.cache,
                    s.loaded.model,  # float32: the reference every compression starts from
                    {"model": s.loaded.fingerprint, "dtype": "float32"},
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
        return in_precision(compressed.model, s.matrix.precision, copy_first=False)

    # --- activations and model loss ---------------------------------------------------------------------------

    def activations(self, state: ModelState, split: str, hook: HookPoint) -> ShardedActivations:
        """``state``'s activations at ``hook`` on ``split``; one model pass collects every hook of the matrix."""
        if (split, str(hook)) not in state.acts:
            s = self.setting
            parts = {**state.identity, "tokens": s.blocks.key, "split": split}
            with self.timed(f"activations {state.label} {split}"):
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
        """Next-token loss and perplexity of ``state`` on the eval split (the same tokens for every cell): from a
        splice metric's clean pass when one covered the split (``clean_loss``), else from a pass of its own."""
        if state.lm is None:
            s = self.setting
            with self.timed(f"model loss {state.label}"):
                self.cache.computed(
                    "lm",
                    self._loss_key(state),
                    lambda tmp: next_token_loss(
                        state.model, s.blocks.eval, s.loaded.tokenizer, device=s.device, progress=self.progress
                    ),
                )
            state.lm = self.cache.meta("lm", self._loss_key(state))
        return {"model_ce": state.lm["ce"], "model_ppl": state.lm["ppl"]}

    def clean_loss(self, state: ModelState) -> Callable[[int, float, int], None]:
        """A ``SpliceContext.clean_loss`` for ``state``: a clean pass over the whole eval split is its model loss,
        cached as ``model_loss`` would cache its own (a pass over fewer blocks is ignored)."""

        def take(n_blocks: int, total: float, count: int) -> None:
            if state.lm is None and n_blocks == len(self.setting.blocks.eval) and count:
                loss = {"ce": total / count, "ppl": math.exp(total / count), "n_predictions": count}
                self.cache.computed("lm", self._loss_key(state), lambda tmp: loss)
                state.lm = self.cache.meta("lm", self._loss_key(state))

        return take

    def _loss_key(self, state: ModelState) -> str:
        return cache_key({**state.identity, "tokens": self.setting.blocks.key, "what": "next_token_loss"})

    # --- SAEs -----------------------------------------------------------------------------------------------

    def sae(
        self,
        source: Source,
        sae: Resolved[SAEArchitecture],
        target: ModelState,
        hook: HookPoint,
        pruner: Resolved[SAEPruner] | None = None,
        loaded: LoadedRef | None = None,
    ) -> SAEArtifact:
        """The SAE of ``source`` for a cell scored on ``target`` (``pruner`` for ``pruned:`` sources; ``loaded``:
        the files of a ``loaded:`` source, or of the one ``retrained``, ``finetuned`` and ``pruned`` derive
        from)."""
        if source.kind == "pruned":
            assert pruner is not None and source.sparsity is not None
            return self.pruned(self.original(sae, hook, loaded, source.seed), pruner, source.sparsity, target, hook)
        if source.kind == "finetuned":
            assert source.tokens is not None
            return self.finetuned(self.original(sae, hook, loaded, source.seed), sae, source.tokens, target, hook)
        if source.kind == "retrained" and loaded is not None:
            original = self.loaded(loaded).sae
            mirrored = self.mirrored(sae, original)
            trained = self.trained(mirrored, target, hook, layer_norm=bool(original.layer_norm), seed=source.seed)
            like = {"architecture": original.name, "d_sae": original.d_sae, "source": loaded.source}
            return SAEArtifact(trained.sae, trained.cost, trained.key, {"retrained_like": like})
        if source.kind == "retrained":
            return self.trained(sae, target, hook, seed=source.seed)
        return self.original(sae, hook, loaded, source.seed)

    def original(
        self, sae: Resolved[SAEArchitecture], hook: HookPoint, loaded: LoadedRef | None, seed: int | None = None
    ) -> SAEArtifact:
        """The SAE that plays ``original``: the loaded one when the matrix has one, else ``sae`` trained on M
        (initialised with ``seed``, by default the matrix's)."""
        return self.loaded(loaded) if loaded is not None else self.trained(sae, self.base, hook, seed=seed)

    def loaded(self, ref: LoadedRef) -> SAEArtifact:
        """The SAE of a ``loaded:`` source, read once per run; nothing is written to the cache."""
        key = cache_key(ref.identity())
        if key not in self._saes:
            start = time.perf_counter()
            sae = load_pretrained(ref.path, self.architectures, ref.file.format).to(self.setting.device).eval()
            cost = {"sae_seconds": time.perf_counter() - start, "sae_tokens": 0}
            details = {"loaded": {"format": ref.file.format, "path": str(ref.path), "hook": ref.file.hook}}
            self._remember(SAEArtifact(sae, cost, key, details))
        return self._saes[key]

    def mirrored(self, sae: Resolved[SAEArchitecture], original: SAE) -> Resolved[SAEArchitecture]:
        """The registry entry ``retrained`` trains for a loaded ``original`` (module doc)."""
        params = original.params.model_dump(mode="json")
        fixed = (original.params.model_fields_set - set(TRAINING_INIT)) | set(WIDTH_PARAMS)
        if sae.entry.plugin == original.name:
            params |= {k: v for k, v in sae.entry.params.items() if k not in fixed}
        component = self.architectures[original.name]
        entry = SAEEntry(plugin=original.name, params=params, training=sae.entry.training)
        return Resolved("saes", sae.name, component, component.Params.model_validate(params), entry)

    def trained(
        self,
        sae: Resolved[SAEArchitecture],
        on: ModelState,
        hook: HookPoint,
        *,
        layer_norm: bool = False,
        seed: int | None = None,
    ) -> SAEArtifact:
        """An SAE of ``sae`` trained on ``on``'s activations at ``hook`` (``original`` when ``on`` is M),
        initialised with ``seed`` (default: the matrix's); with ``layer_norm``, on the activations layer-normed
        per token, and it keeps the norm."""
        s = self.setting
        seed = s.matrix.seed if seed is None else seed
        acts = self.activations(on, "train", hook)
        key = trained_sae_key(acts, sae, seed, layer_norm)
        if key in self._saes:
            return self._saes[key]

        def build() -> SAE:
            return sae.component.build(acts.d_in, sae.params, seed=seed)

        def keep_norm(model: SAE) -> None:  # trained on layer-normed inputs, it normalises its own from now on
            model.layer_norm.fill_(layer_norm)

        source = LayerNormed(acts) if layer_norm else acts
        phase = f"train SAE {sae.name} on {on.label}"
        meta = self._train_stored(key, phase, build, source, sae.entry.training, after=keep_norm)
        cost = {"sae_seconds": meta["seconds"], "sae_tokens": meta["tokens"], **_activation_cost(acts)}
        return self._remember(SAEArtifact(self._load(key), cost, key))

    def finetuned(
        self, original: SAEArtifact, sae: Resolved[SAEArchitecture], tokens: int, target: ModelState, hook: HookPoint
    ) -> SAEArtifact:
        """``original`` trained further on ``target``'s train-split activations at ``hook`` for ``tokens`` tokens:
        the ``saes`` entry's training config with only ``tokens`` replaced (so warmup and decay are shares of the
        fine-tuning budget), a fresh Adam, and the original's input normalisation and b_dec kept (no
        data-dependent initialisation). ``tokens == 0`` is the original itself, bit for bit, at no cost."""
        details = {"finetuned": {"tokens": tokens, "from": original.key}}
        spent = {f"original_{k}": original.cost[k] for k in ("sae_seconds", "sae_tokens")}
        if tokens == 0:
            key = cache_key({"sae": original.key, "finetune": 0})
            return SAEArtifact(original.sae, {"sae_seconds": 0.0, "sae_tokens": 0, **spent}, key, details)
        acts = self.activations(target, "train", hook)
        training = sae.entry.training.model_copy(update={"tokens": tokens})
        key = cache_key({"sae": original.key, "finetune": training.model_dump(mode="json"), "acts": acts.path.name})
        if key in self._saes:
            return self._saes[key]

        source = LayerNormed(acts) if bool(original.sae.layer_norm) else acts
        phase = f"fine-tune SAE {sae.name} on {target.label}"
        meta = self._train_stored(key, phase, lambda: copy.deepcopy(original.sae), source, training, from_scratch=False)
        cost = {"sae_seconds": meta["seconds"], "sae_tokens": meta["tokens"], **spent, **_activation_cost(acts)}
        return self._remember(SAEArtifact(self._load(key), cost, key, details))

    def pruned(
        self,
        original: SAEArtifact,
        pruner: Resolved[SAEPruner],
        sparsity: float,
        target: ModelState,
        hook: HookPoint,
    ) -> SAEArtifact:
        """``original`` pruned by ``pruner`` at ``sparsity``, calibrated on ``target``'s calibration split."""
        calibration = self.activations(target, "calibration", hook)
        key = pruned_sae_key(original.key, pruner, sparsity, calibration)
        if key in self._saes:
            return self._saes[key]

        @self.timed_call(f"prune SAE ({pruner.name}) on {target.label}")
        def write(tmp: Path) -> dict:
            start = time.perf_counter()
            pruned = pruner.component.prune(original.sae, pruner.params, calibration, sparsity)
            seconds = time.perf_counter() - start
            save_sae(pruned, tmp)
            achieved = sae_sparsity(pruned, reference=original.sae)
            return {"seconds": seconds, "tokens": calibration.n_tokens, "achieved": achieved}

        self.cache.computed("saes", key, write)
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

    def _train_stored(
        self,
        key: str,
        phase: str,
        build: Callable[[], SAE],
        source: ActivationSource,
        training: TrainingConfig,
        *,
        from_scratch: bool = True,
        after: Callable[[SAE], None] = lambda model: None,
    ) -> dict:
        """Train ``build()`` on ``source`` and store it under ``key`` unless cached (its checkpoint is deleted
        only once the SAE is stored); the stored meta (seconds, tokens, steps, final training statistics)."""

        @self.timed_call(phase)
        def write(tmp: Path) -> dict:
            model = build()
            result = train_sae(
                model,
                source,
                training,
                device=self.setting.device,
                progress=self.progress,
                checkpoint_dir=self.cache.root / "checkpoints" / key,
                from_scratch=from_scratch,
            )
            after(model)
            save_sae(model, tmp)
            final = {f"train_{k}": v for k, v in result.final.items()}
            return {"seconds": result.seconds, "tokens": result.tokens, "steps": result.steps, **final}

        self.cache.computed("saes", key, write)
        shutil.rmtree(self.cache.root / "checkpoints" / key, ignore_errors=True)  # the SAE is stored now
        return self.cache.meta("saes", key)

    def _load(self, key: str) -> SAE:
        return load_sae(self.cache.dir("saes", key), self.architectures).to(self.setting.device).eval()

    def _remember(self, artifact: SAEArtifact) -> SAEArtifact:
        self._saes[artifact.key] = artifact
        return artifact


def _activation_cost(acts: ShardedActivations) -> dict[str, float]:
    """Seconds of the model pass that collected the activations an SAE was trained or calibrated on."""
    return {} if acts.seconds is None else {"activation_seconds": acts.seconds}
