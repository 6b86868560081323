"""The artifacts of one model's part of a matrix run, each computed once: M and its compressed versions (an
M_c is built only when something not yet cached needs it), activations per (model, split, hook), SAEs
(trained, fine-tuned, pruned, loaded; ``saex.run.sae_artifacts``) with their cache key and cost, and the
scored model's next-token loss.

Every artifact is memoised in memory and cached on disk under a key that hashes the resolved identity of
everything that determines it (``Resolved.identity()``: plugin and params with defaults filled in). Nothing
here knows about cells or the results store (``saex.run.runner``).
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import ParamSpec, TypeVar

import torch
from torch import nn

from saex.config.registry import MatrixEntry, Resolved
from saex.data.corpus import TokenBlocks
from saex.model.activations import ShardedActivations, collect_activations
from saex.model.compressed import compress_verified
from saex.model.hookpoints import HookPoint
from saex.model.labelled_activations import LabelledActivations, LabelledInput
from saex.model.language_model import next_token_loss
from saex.model.precision import in_precision
from saex.model.splice import Prefixes
from saex.plugin.protocols import (
    CompressionContext,
    Compressor,
    LoadedModel,
    SAEArchitecture,
)
from saex.run.sae_artifacts import SAEArtifacts
from saex.storage.cache import Cache, cache_key

P = ParamSpec("P")
T = TypeVar("T")


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
class Setting:
    """What every artifact of one model shares: the matrix, the loaded model, its token splits, the hooks."""

    matrix: MatrixEntry
    loaded: LoadedModel
    blocks: TokenBlocks
    hooks: list[HookPoint]
    device: torch.device
    labelled: dict[str, LabelledInput] = field(default_factory=dict)  # the sets the matrix's metrics read


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
        self.record = record  # (phase, seconds) of each timed phase, for the store
        self.saes = SAEArtifacts(self)
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
        blocks = self.setting.blocks
        return self._collected(state, split, hook, lambda: blocks.split(split), {"tokens": blocks.key, "split": split})

    def labelled(self, state: ModelState, hook: HookPoint, name: str) -> LabelledActivations:
        """``state``'s activations at ``hook`` on the labelled set ``name``: one model pass over its texts
        collects every hook of the matrix, cached by the texts' token rows and labels."""
        prepared = self.setting.labelled.get(name)
        if prepared is None:
            known = sorted(self.setting.labelled)
            raise ValueError(f"labelled set {name!r} is not one this matrix's metrics read: {known}")
        parts = {"labelled": prepared.key}
        acts = self._collected(state, f"labelled:{name}", hook, lambda: prepared.blocks, parts)
        return prepared.with_activations(acts)

    def _collected(
        self, state: ModelState, split: str, hook: HookPoint, blocks: Callable[[], torch.Tensor], parts: dict
    ) -> ShardedActivations:
        """``state``'s activations at ``hook`` on the token rows ``blocks()`` (named ``split``), cached under
        ``parts`` and the model's identity: one model pass collects every hook of the matrix."""
        if (split, str(hook)) not in state.acts:
            s = self.setting
            with self.timed(f"activations {state.label} {split}"):
                found = collect_activations(
                    self.cache,
                    lambda: state.model,
                    s.loaded.tokenizer,
                    blocks(),
                    s.hooks,
                    {**state.identity, **parts},
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
