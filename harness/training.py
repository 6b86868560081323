"""Train any SAE architecture on an activation source: Adam, warmup / constant / linear-decay schedule,
seeded epochs, progress bar, divergence check. Deterministic on CPU for a fixed seed."""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Iterator

import torch
from pydantic import BaseModel, Field
from tqdm import tqdm

from harness.protocols import ActivationSource
from harness.sae import SAE, TrainStep

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


@dataclass
class TrainingResult:
    seconds: float
    tokens: int
    steps: int
    final: dict[str, float]  # loss, l0, explained_variance (batch-wise), dead_frac: smoothed over last steps


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the message names the step and suggests a lower learning rate."""


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
    sae: SAE, source: ActivationSource, cfg: TrainingConfig, *, device: torch.device, progress: bool = True
) -> TrainingResult:
    """Train ``sae`` in place on ``device`` (it stays there) for ``cfg.tokens`` tokens of ``source``.

    Starts a fresh run: the SAE's data-dependent initialisation (``init_from_data``: input normalisation,
    b_dec) runs first and counts towards ``seconds``. Raises ``TrainingDiverged`` on a NaN/Inf loss."""
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    sae.init_from_data(source)
    sae.to(device).train()
    optimizer = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=cfg.adam_betas)
    window_steps = math.ceil(min(source.n_tokens, cfg.tokens) / cfg.batch_size)
    tracker = _Tracker(sae.d_sae, window_steps, device)
    seen, steps = 0, 0
    with tqdm(total=cfg.tokens, unit="tok", desc=f"train {sae.architecture}", disable=not progress) as bar:
        for x in _batches(source, cfg):
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * lr_factor((seen + x.shape[0] / 2) / cfg.tokens, cfg)
            x = x.to(device, non_blocking=True)
            step = sae.training_loss(x)
            _check_finite(step, steps, seen, cfg)
            optimizer.zero_grad(set_to_none=True)
            step.loss.backward()
            sae.before_step()
            optimizer.step()
            sae.after_step()
            tracker.add(x, step)
            seen, steps = seen + x.shape[0], steps + 1
            bar.update(x.shape[0])
            bar.set_postfix(tracker.postfix(), refresh=False)
    sae.eval()
    return TrainingResult(time.perf_counter() - start, seen, steps, tracker.summary())


def _batches(source: ActivationSource, cfg: TrainingConfig) -> Iterator[torch.Tensor]:
    """Exactly ``cfg.tokens`` tokens: epochs reshuffled with seed ``cfg.seed + epoch``, the last batch cut."""
    remaining, epoch = cfg.tokens, 0
    while remaining > 0:
        for x in source.iter_batches(cfg.batch_size, shuffle=True, seed=cfg.seed + epoch):
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


class _Tracker:
    """Smoothed batch statistics for the progress bar and the result, and per-latent last-fired steps."""

    def __init__(self, d_sae: int, window_steps: int, device: torch.device):
        self.history: deque[dict[str, float]] = deque(maxlen=SMOOTHING_STEPS)
        self.last_fired = torch.full((d_sae,), -1, dtype=torch.long, device=device)
        self.window_steps = window_steps
        self.step = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor, step: TrainStep) -> None:
        active = step.f != 0
        self.last_fired.masked_fill_(active.any(0), self.step)
        self.history.append(
            {
                "loss": step.loss.item(),
                "l0": active.sum(-1).double().mean().item(),
                "residual": (x - step.x_hat).double().pow(2).sum().item(),
                "variance": (x - x.mean(0)).double().pow(2).sum().item(),
            }
        )
        self.step += 1

    def summary(self) -> dict[str, float]:
        sums = {key: sum(h[key] for h in self.history) for key in self.history[0]}
        # dead = did not fire during the last pass over the data (or the whole run, if shorter)
        dead = self.last_fired < self.step - self.window_steps
        return {
            "loss": sums["loss"] / len(self.history),
            "l0": sums["l0"] / len(self.history),
            "explained_variance": 1 - sums["residual"] / sums["variance"] if sums["variance"] > 0 else math.nan,
            "dead_frac": dead.double().mean().item(),
        }

    def postfix(self) -> dict[str, str]:
        s = self.summary()
        return {"loss": f"{s['loss']:.4g}", "L0": f"{s['l0']:.1f}", "EV": f"{s['explained_variance']:.3f}",
                "dead": f"{s['dead_frac']:.2f}"}
