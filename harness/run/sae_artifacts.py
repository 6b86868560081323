"""The SAEs of one model's part of a matrix run, each obtained once and cached by content key: trained
(``original`` on M, ``retrained`` on M_c, ``original@seed=<n>``), fine-tuned, pruned and loaded, with what each
cost. The models and activations they are trained on come from ``saex.run.artifacts.Artifacts``.

A loaded SAE (``loaded:``) takes the place of the trained original: ``pruned`` prunes it, ``finetuned`` trains it
further, and ``retrained`` trains the same SAE afresh on M_c (``mirrored``): the loaded SAE's architecture and the
params its files fix (width, k, ...; all of them for a file saex wrote), the params the matrix's ``saes`` entry
writes out for the rest when the entry is of that architecture (what only shapes training: loss weights,
``normalize_input``, ``b_dec_init``), and the entry's ``training``. A loaded SAE with a per-token layer norm is
retrained (and fine-tuned) on layer-normed activations, as OpenAI trained theirs, and keeps the norm.
"""

from __future__ import annotations

import copy
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from saex.config.pretrained import LoadedRef
from saex.config.registry import Resolved, SAEEntry
from saex.config.sources import Source
from saex.model.activations import ShardedActivations
from saex.model.hookpoints import HookPoint
from saex.plugin.protocols import ActivationSource, SAEArchitecture, SAEPruner
from saex.plugin.returns import returned
from saex.sae.base import SAE, layer_norm, load_sae, save_sae
from saex.sae.formats import load_pretrained
from saex.sae.sparsity import sae_sparsity
from saex.sae.training import TrainingConfig, train_sae
from saex.storage.cache import cache_key

if TYPE_CHECKING:
    from saex.run.artifacts import Artifacts, ModelState

SAE_VERSION = 2  # 2: saved SAEs carry the ``layer_norm`` buffer
WIDTH_PARAMS = ("d_sae", "expansion_factor")  # a retrained SAE keeps the loaded one's width
TRAINING_INIT = ("normalize_input", "b_dec_init")  # readers of foreign files set these only to describe them


@dataclass
class SAEArtifact:
    sae: SAE
    cost: dict[str, float]
    key: str  # cache key (for SAEs loaded from a user's files, a hash of their identity: nothing is cached)
    details: dict = field(default_factory=dict)


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


class SAEArtifacts:
    """Every SAE of one model's run, memoised by cache key; ``models`` provides M, M_c and their activations."""

    def __init__(self, models: Artifacts):
        self.models = models
        self._saes: dict[str, SAEArtifact] = {}

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
        return self.loaded(loaded) if loaded is not None else self.trained(sae, self.models.base, hook, seed=seed)

    def loaded(self, ref: LoadedRef) -> SAEArtifact:
        """The SAE of a ``loaded:`` source, read once per run; nothing is written to the cache."""
        key = cache_key(ref.identity())
        if key not in self._saes:
            start = time.perf_counter()
            sae = load_pretrained(ref.path, self.models.architectures, ref.file.format)
            sae = sae.to(self.models.setting.device).eval()
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
        component = self.models.architectures[original.name]
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
        s = self.models.setting
        seed = s.matrix.seed if seed is None else seed
        acts = self.models.activations(on, "train", hook)
        key = trained_sae_key(acts, sae, seed, layer_norm)
        if key in self._saes:
            return self._saes[key]

        def build() -> SAE:
            built = sae.component.build(acts.d_in, sae.params, seed=seed)
            return returned(built, SAE, sae.component.name, "SAEArchitecture", "build")

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
        acts = self.models.activations(target, "train", hook)
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
        calibration = self.models.activations(target, "calibration", hook)
        key = pruned_sae_key(original.key, pruner, sparsity, calibration)
        if key in self._saes:
            return self._saes[key]

        @self.models.timed_call(f"prune SAE ({pruner.name}) on {target.label}")
        def write(tmp: Path) -> dict:
            start = time.perf_counter()
            pruned = pruner.component.prune(original.sae, pruner.params, calibration, sparsity)
            returned(pruned, SAE, pruner.component.name, "SAEPruner", "prune")
            seconds = time.perf_counter() - start
            save_sae(pruned, tmp)
            achieved = sae_sparsity(pruned, reference=original.sae)
            return {"seconds": seconds, "tokens": calibration.n_tokens, "achieved": achieved}

        self.models.cache.computed("saes", key, write)
        meta = self.models.cache.meta("saes", key)
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

        @self.models.timed_call(phase)
        def write(tmp: Path) -> dict:
            model = build()
            result = train_sae(
                model,
                source,
                training,
                device=self.models.setting.device,
                progress=self.models.progress,
                checkpoint_dir=self.models.cache.root / "checkpoints" / key,
                from_scratch=from_scratch,
            )
            after(model)
            save_sae(model, tmp)
            final = {f"train_{k}": v for k, v in result.final.items()}
            return {"seconds": result.seconds, "tokens": result.tokens, "steps": result.steps, **final}

        self.models.cache.computed("saes", key, write)
        shutil.rmtree(self.models.cache.root / "checkpoints" / key, ignore_errors=True)  # the SAE is stored now
        return self.models.cache.meta("saes", key)

    def _load(self, key: str) -> SAE:
        sae = load_sae(self.models.cache.dir("saes", key), self.models.architectures)
        return sae.to(self.models.setting.device).eval()

    def _remember(self, artifact: SAEArtifact) -> SAEArtifact:
        self._saes[artifact.key] = artifact
        return artifact


def _activation_cost(acts: ShardedActivations) -> dict[str, float]:
    """Seconds of the model pass that collected the activations an SAE was trained or calibrated on."""
    return {} if acts.seconds is None else {"activation_seconds": acts.seconds}
