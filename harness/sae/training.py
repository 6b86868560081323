"""Train any SAE architecture on an activation source: Adam, warmup / constant / linear-decay schedule,
seeded epochs, progress bar, divergence check, optional bf16 autocast, resumable checkpoints. Deterministic on
CPU for a fixed seed, and a resumed run ends with the same weights as an uninterrupted one."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, Field
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from saex.plugin.protocols import ActivationSource
from saex.sae.base import SAE, TrainStep

SMOOTHING_STEPS = 20  # reported metrics are means over the last steps, not one noisy batch


class TrainingConfig(BaseModel):
    model_config = {"extra": "forbid"}

    tokens: int = Field(200_000, gt=0, description="total training tokens; the source repeats when smaller")
    batch_size: int = Field(1024, gt=0)
    lr: float = Field(1e-3, gt=0)
    warmup_frac: float = Field(0.05, ge=0, le=1)
    decay_frac: float = Field(0.2, ge=0, le=1, description="linear decay to 0 over this last share of tokens")
    adam_betas: tuple[float, float] = (0.9, 0.999)
    seed: int = 0
    precision: Literal["float32", "bfloat16"] = Field(
        "float32", description="bfloat16: autocast the forward (parameters, Adam state and loss stay float32)"
    )


@dataclass
class TrainingResult:
    seconds: float
    tokens: int
    steps: int
    final: dict[str, float]  # loss, l0, explained_variance (batch-wise), dead_frac: smoothed over last steps


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the message names the step and suggests a lower learning rate."""


class CheckpointMismatch(ValueError):
    """A checkpoint directory holds a run of another SAE, config or data: names the file and what differs."""


CHECKPOINT_FILE = "checkpoint.safetensors"


def lr_factor(progress: float, cfg: TrainingConfig) -> float:
    """Multiplier of cfg.lr at ``progress`` (share of training tokens, taken at the middle of a step so neither
    the first nor the last step gets lr 0): linear warmup, constant, then linear decay to 0 over the last
    ``decay_frac``."""
    if progress < cfg.warmup_frac:
        return progress / cfg.warmup_frac
    if cfg.decay_frac > 0 and progress > 1 - cfg.decay_frac:
        return max(0.0, (1 - progress) / cfg.decay_frac)
    return 1.0


def train_sae(
    sae: SAE,
    source: ActivationSource,
    cfg: TrainingConfig,
    *,
    device: torch.device,
    progress: bool = True,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int | None = None,
    from_scratch: bool = True,
) -> TrainingResult:
    """Train ``sae`` in place on ``device`` (it stays there) for ``cfg.tokens`` tokens of ``source``.

    A fresh run first does the SAE's data-dependent initialisation (``init_from_data``: input normalisation,
    b_dec), which counts towards ``seconds``; ``from_scratch=False`` skips it, to fine-tune a trained SAE with
    its normalisation and b_dec as they are (a fresh Adam and the same schedule either way). With
    ``checkpoint_dir``, the full training state (weights and buffers, Adam, position in the data, smoothed
    statistics, elapsed seconds) is written there atomically
    every ``checkpoint_every`` tokens (default: about 10 times per run); a later call with the same directory,
    a freshly built SAE of the same architecture and params, the same config and the same source resumes from
    it and ends bit-identical (on CPU) to an uninterrupted run. After the last step the SAE's
    ``after_training`` fits what inference needs (BatchTopK's threshold). The checkpoint stays when training
    finishes: the caller deletes it once the SAE it produced is safely stored (a kill in between then loses
    nothing). Raises ``TrainingDiverged`` on a NaN/Inf loss and ``CheckpointMismatch`` when the directory
    holds another run."""
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    checkpoint = _Checkpoint(Path(checkpoint_dir), _run_identity(sae, source, cfg)) if checkpoint_dir else None
    every = checkpoint_every or max(cfg.tokens // 10, 1)
    state = checkpoint.load() if checkpoint else None
    if state is None and from_scratch:
        sae.init_from_data(source)
    elif state is not None:
        sae.load_state_dict(state["sae"], strict=True)
    sae.to(device).train()
    optimizer = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=cfg.adam_betas)
    window_steps = math.ceil(min(source.n_tokens, cfg.tokens) / cfg.batch_size)
    tracker = _Tracker(sae.d_sae, window_steps, device)
    seen, steps, earlier_seconds = 0, 0, 0.0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        tracker.load_state_dict(state["tracker"])
        seen, steps, earlier_seconds = state["seen"], state["steps"], state["seconds"]
        torch.set_rng_state(state["rng"])
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bfloat16")
    next_checkpoint = (seen // every + 1) * every
    with tqdm(total=cfg.tokens, initial=seen, unit="tok", desc=f"train {sae.name}", disable=not progress) as bar:
        for x in _batches(source, cfg, skip=seen):
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * lr_factor((seen + x.shape[0] / 2) / cfg.tokens, cfg)
            x = x.to(device, non_blocking=True)
            with autocast:
                step = sae.training_loss(x)
            _check_finite(step, steps, seen, cfg)
            optimizer.zero_grad(set_to_none=True)
            step.loss.backward()
            sae.before_step()
            optimizer.step()
            sae.after_step()
            tracker.add(x, step)
            _check_converging(tracker, steps, seen, cfg)
            seen, steps = seen + x.shape[0], steps + 1
            bar.update(x.shape[0])
            bar.set_postfix(tracker.postfix(), refresh=False)
            if checkpoint and seen >= next_checkpoint and seen < cfg.tokens:
                checkpoint.save(sae, optimizer, tracker, seen, steps, earlier_seconds + time.perf_counter() - start)
                next_checkpoint = (seen // every + 1) * every
    sae.eval()
    with torch.no_grad():
        sae.after_training(source, cfg.batch_size)
    return TrainingResult(earlier_seconds + time.perf_counter() - start, seen, steps, tracker.summary())


def _run_identity(sae: SAE, source: ActivationSource, cfg: TrainingConfig) -> str:
    """What a checkpoint must match to be resumed: architecture, sizes, params, config, data size."""
    return json.dumps(
        {
            "architecture": sae.name,
            "d_in": sae.d_in,
            "d_sae": sae.d_sae,
            "params": sae.params.model_dump(mode="json"),
            "training": cfg.model_dump(mode="json"),
            "n_tokens": source.n_tokens,
        },
        sort_keys=True,
    )


class _Checkpoint:
    """One safetensors file in ``directory``, replaced atomically, so an interruption leaves the previous
    checkpoint. Tensors are stored as tensors and everything else as JSON in the file's metadata: nothing read
    back can execute code. An unreadable file is moved aside (named in a warning) and training starts afresh."""

    def __init__(self, directory: Path, identity: str):
        self.path, self.identity = directory / CHECKPOINT_FILE, identity

    def load(self) -> dict | None:
        if not self.path.is_file():
            return None
        try:
            with safe_open(str(self.path), framework="pt") as f:
                skeleton = json.loads(f.metadata()["state"])
                tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open has no iter)
            state = _unflatten(skeleton, tensors)
        except Exception as exc:  # any damage: the checkpoint is only a shortcut, never a reason to fail
            aside = self.path.with_name(f"{self.path.name}.unreadable-{time.time_ns()}")
            os.replace(self.path, aside)
            print(f"saex: checkpoint {self.path} unreadable ({type(exc).__name__}); moved to {aside}", file=sys.stderr)
            return None
        if state.get("identity") != self.identity:
            raise CheckpointMismatch(
                f"{self.path}: checkpoint of another run; it has {state.get('identity')}, this run is "
                f"{self.identity}; delete it or use another checkpoint_dir"
            )
        return state

    def save(
        self, sae: SAE, optimizer: torch.optim.Optimizer, tracker: "_Tracker", seen: int, steps: int, seconds: float
    ) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "identity": self.identity,
            "sae": {k: v.detach().cpu() for k, v in sae.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "tracker": tracker.state_dict(),
            "seen": seen,
            "steps": steps,
            "seconds": seconds,
            "rng": torch.get_rng_state(),
        }
        tensors: dict[str, torch.Tensor] = {}
        skeleton = _flatten(state, tensors)
        tmp = self.path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"state": json.dumps(skeleton)})
        os.replace(tmp, self.path)


def _flatten(value: object, tensors: dict[str, torch.Tensor]) -> object:
    """JSON skeleton of nested dicts/lists/scalars with each tensor moved into ``tensors`` (referenced by
    name). Dicts become key/value pair lists, so integer keys (optimizer state) stay integers."""
    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = value.detach().cpu()
        return {"tensor": name}
    if isinstance(value, dict):
        return {"dict": [[k, _flatten(v, tensors)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return {"list": [_flatten(v, tensors) for v in value], "tuple": isinstance(value, tuple)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    raise TypeError(f"cannot checkpoint a {type(value).__name__}")


def _unflatten(node: dict, tensors: dict[str, torch.Tensor]) -> object:
    if "tensor" in node:
        return tensors[node["tensor"]]
    if "dict" in node:
        return {k: _unflatten(v, tensors) for k, v in node["dict"]}
    if "list" in node:
        items = [_unflatten(v, tensors) for v in node["list"]]
        return tuple(items) if node["tuple"] else items
    return node["value"]


def _batches(source: ActivationSource, cfg: TrainingConfig, skip: int = 0) -> Iterator[torch.Tensor]:
    """Exactly ``cfg.tokens`` tokens: epochs reshuffled with seed ``cfg.seed + epoch``, the last batch cut.

    ``skip`` (tokens already trained, a step boundary) resumes the same sequence: whole epochs are skipped
    without reading, and batches of the current epoch are read and dropped."""
    epoch, offset = divmod(skip, source.n_tokens)
    remaining = cfg.tokens - skip
    while remaining > 0:
        for x in source.iter_batches(cfg.batch_size, shuffle=True, seed=cfg.seed + epoch):
            if offset > 0:
                offset -= x.shape[0]
                continue
            x = x[:remaining]
            yield x
            remaining -= x.shape[0]
            if remaining == 0:
                return
        epoch += 1


def _check_finite(step: TrainStep, index: int, seen: int, cfg: TrainingConfig) -> None:
    value = step.loss.item()
    if not math.isfinite(value):
        raise TrainingDiverged(
            f"SAE training diverged: loss is {value} at step {index} (after {seen} tokens); "
            f"try a lower lr than {cfg.lr:g}, or check the activations for NaN/Inf"
        )


DIVERGED_EV = -100.0  # a reconstruction error 100x the data's variance, over a full smoothing window


def _check_converging(tracker: _Tracker, index: int, seen: int, cfg: TrainingConfig) -> None:
    """A finite loss can still be runaway (lr far too high): explained variance far below 0 over a whole
    smoothing window stops training like a NaN does, instead of storing an SAE that explains nothing."""
    if len(tracker.history) < SMOOTHING_STEPS:
        return
    ev = tracker.explained_variance()
    if ev < DIVERGED_EV:
        raise TrainingDiverged(
            f"SAE training diverged: explained variance {ev:.3g} over the last {SMOOTHING_STEPS} steps at step "
            f"{index} (after {seen} tokens); try a lower lr than {cfg.lr:g}"
        )


class _Tracker:
    """Smoothed batch statistics for the progress bar and the result, and per-latent last-fired steps."""

    def __init__(self, d_sae: int, window_steps: int, device: torch.device):
        self.history: deque[dict[str, float]] = deque(maxlen=SMOOTHING_STEPS)
        self.last_fired = torch.full((d_sae,), -1, dtype=torch.long, device=device)
        self.window_steps = window_steps
        self.step = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor, step: TrainStep) -> None:
        l0, fired = step.activity()
        self.last_fired.masked_fill_(fired, self.step)
        self.history.append(
            {
                "loss": step.loss.item(),
                "l0": l0,
                "residual": (x - step.x_hat).double().pow(2).sum().item(),
                "variance": (x - x.mean(0)).double().pow(2).sum().item(),
            }
        )
        self.step += 1

    def state_dict(self) -> dict:
        return {"history": list(self.history), "last_fired": self.last_fired.cpu(), "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.history.extend(state["history"])
        self.last_fired.copy_(state["last_fired"])
        self.step = state["step"]

    def explained_variance(self) -> float:
        """Batch-wise explained variance pooled over the smoothing window."""
        residual = sum(h["residual"] for h in self.history)
        variance = sum(h["variance"] for h in self.history)
        return 1 - residual / variance if variance > 0 else math.nan

    def summary(self) -> dict[str, float]:
        sums = {key: sum(h[key] for h in self.history) for key in self.history[0]}
        # dead = did not fire during the last pass over the data (or the whole run, if shorter)
        dead = self.last_fired < self.step - self.window_steps
        return {
            "loss": sums["loss"] / len(self.history),
            "l0": sums["l0"] / len(self.history),
            "explained_variance": self.explained_variance(),
            "dead_frac": dead.double().mean().item(),
        }

    def postfix(self) -> dict[str, str]:
        s = self.summary()
        return {
            "loss": f"{s['loss']:.4g}",
            "L0": f"{s['l0']:.1f}",
            "EV": f"{s['explained_variance']:.3f}",
            "dead": f"{s['dead_frac']:.2f}",
        }
