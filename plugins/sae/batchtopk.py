"""BatchTopK SAE (Bussmann et al. 2024, "BatchTopK Sparse Autoencoders"): in training keep the k * batch
largest activations of the whole batch (k per token on average, so the SAE can spend more latents on harder
tokens); for inference a single threshold theta replaces the batch dependency, f = ReLU(pre) * (pre > theta).
theta is the smallest kept activation of a batch, averaged: by default over batches of the final SAE after
training (the paper's estimate), or as SAELens does, an exponential moving average during training (which
lags when the run has few steps: its time constant is 1 / threshold_lr steps)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from pydantic import Field

from saex import (
    ActivationSource,
    SAEFormatError,
    SAELensExport,
    SAELensImport,
    SparsePattern,
    TrainStep,
    hookimpl,
    sample_batches,
)
from saex.plugins.sae.topk import TopKParams, TopKSAE


class BatchTopKParams(TopKParams):
    k: float = Field(32, gt=0, description="active latents per token, on average over a training batch")  # type: ignore
    threshold_fit: Literal["after_training", "ema"] = Field(
        "after_training", description="how the inference threshold is fitted (see the module doc)"
    )
    threshold_lr: float = Field(0.01, gt=0, le=1, description="EMA rate of the threshold during training")


class BatchTopKSAE(TopKSAE):
    """Training: f = ReLU(pre) restricted to the batch's top k*n values. Inference (``encode``, ``forward``):
    f = ReLU(pre) * (pre > threshold). AuxK and unit-norm decoder rows as TopK. Saved for SAELens as its
    ``jumprelu`` with every latent's threshold equal to the fitted one, which is how SAELens saves it."""

    name = "batchtopk"
    description = "BatchTopK SAE (Bussmann et al. 2024): k per token on average over a batch; threshold at inference"
    Params = BatchTopKParams
    saelens_architectures = ("batchtopk", "jumprelu")
    params: BatchTopKParams

    def __init__(self, d_in: int, params: BatchTopKParams, *, seed: int = 0):
        super().__init__(d_in, params, seed=seed)
        self.register_buffer("threshold", torch.zeros(()))

    @classmethod
    def from_saelens(cls, cfg: Mapping[str, Any], extra: dict[str, torch.Tensor]) -> SAELensImport | None:
        """SAELens's training checkpoint (``batchtopk``: its EMA ``topk_threshold`` becomes the threshold), or
        the ``jumprelu`` its inference save writes for a BatchTopK (``metadata.training_architecture:
        batchtopk``, the same threshold for every latent); any other ``jumprelu`` is JumpReLU's."""
        if cfg["architecture"] == "batchtopk":
            if "topk_threshold" not in extra:
                raise SAEFormatError("batchtopk checkpoint without a topk_threshold tensor")
            threshold = extra.pop("topk_threshold").reshape(())
            return SAELensImport(cls.saelens_params(cfg, k=float(cfg["k"])), {"threshold": threshold})
        metadata = cfg.get("metadata") or {}
        threshold = extra.get("threshold")
        if metadata.get("training_architecture") != "batchtopk" or threshold is None:
            return None
        if not bool((threshold == threshold[0]).all()):
            return None
        details = metadata.get("training_architecture_details") or {}
        params = cls.saelens_params(cfg, **({"k": float(details["k"])} if "k" in details else {}))
        return SAELensImport(params, {"threshold": extra.pop("threshold")[0]})

    def to_saelens(self) -> SAELensExport:
        """As SAELens's own inference save of a BatchTopK: a ``jumprelu`` with the threshold repeated per latent."""
        return SAELensExport(
            {"architecture": "jumprelu"},
            {"threshold": self.threshold.detach().expand(self.d_sae)},
            {"training_architecture": "batchtopk", "training_architecture_details": {"k": self.params.k}},
        )

    def encode_scaled(self, x: torch.Tensor) -> torch.Tensor:
        pre = self._pre(x)
        return pre.relu() * (pre > self.threshold).to(pre.dtype)

    def forward_scaled(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.encode_scaled(x)
        return self.decode_scaled(f), f

    def batch_topk(self, pre: torch.Tensor) -> torch.Tensor:
        """Dense f: ReLU(pre) restricted to the batch's k * n largest values."""
        flat = batch_topk_indices(pre, self.k)
        acts = pre.relu().flatten()
        return torch.zeros_like(acts).index_copy_(0, flat, acts[flat]).view_as(pre)

    def training_loss(self, x: torch.Tensor) -> TrainStep:
        x = x * self.norm_scale
        with torch.no_grad():
            pre = torch.addmm(self.b_enc, x - self.b_dec, self.W_enc)  # the bias add fused into the matmul
            pattern, flat = SparsePattern.from_flat(batch_topk_indices(pre, self.k), *pre.shape)
            values = pre.flatten()[flat]
        step = self._sparse_step(x, pre, pattern, values)
        f = step._f
        self._update_threshold(f.values() if f.layout == torch.sparse_csr else f.detach())
        step.parts["threshold"] = float(self.threshold)
        return step

    @torch.no_grad()
    def _update_threshold(self, f: torch.Tensor) -> None:
        positive = f[f > 0]
        if positive.numel():
            lr = self.params.threshold_lr
            updated = (1 - lr) * self.threshold.double() + lr * positive.min().double()
            self.threshold.copy_(updated.to(self.threshold.dtype))

    @torch.no_grad()
    def after_training(self, source: ActivationSource, batch_size: int) -> None:
        """With ``threshold_fit == "after_training"``: the mean over training-size batches (about 100k tokens)
        of the smallest activation BatchTopK keeps."""
        if self.params.threshold_fit != "after_training":
            return
        minima = []
        for x in sample_batches(source, batch_size=batch_size):
            if x.shape[0] < batch_size and minima:
                break  # a short last batch keeps fewer values: its minimum is biased upwards
            f = self.batch_topk(self._pre(x.to(self.W_enc.device) * self.norm_scale))
            positive = f[f > 0]
            if positive.numel():
                minima.append(positive.min().double())
        if minima:
            self.threshold.copy_(torch.stack(minima).mean().to(self.threshold.dtype))


def batch_topk_indices(pre: torch.Tensor, k: float) -> torch.Tensor:
    """Indices into ``pre.flatten()`` of the k * n largest values of ReLU(pre) (ties broken arbitrarily).

    A top-k over the whole flattened batch is ~5x slower than a per-row one on CPU, so first a threshold is
    estimated from every 16th value, and the exact top-k runs only over the values above it; when that
    candidate set is too small (or the threshold is not positive) it falls back to the full top-k. The result
    is exact either way."""
    flat = pre.flatten()
    m = min(int(k * pre.shape[0]), flat.numel())
    stride = 16
    sample = flat[::stride]
    wanted = m // stride + m // (4 * stride) + 64  # the sample's share of m, plus 25% and a margin
    if m > 0 and wanted < sample.numel():
        threshold = sample.topk(wanted, sorted=False).values.min()
        if threshold > 0:
            candidates = (flat >= threshold).nonzero().squeeze(-1)
            if candidates.numel() >= m:
                return candidates[flat[candidates].topk(m, sorted=False).indices]
    return flat.relu().topk(m, sorted=False).indices


@hookimpl
def register_sae_architectures(register: Callable[[type[BatchTopKSAE]], None]) -> None:
    register(BatchTopKSAE)
