"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead"): f_j = pre_j * H(pre_j - theta_j) with a learned
per-latent threshold theta, trained with an L0 penalty through straight-through estimators that use a
rectangle kernel of width ``bandwidth`` for the gradient with respect to theta."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from pydantic import Field

from saex import SAE, SAEFormatError, SAELensExport, SAELensImport, SAEParams, TrainStep, hookimpl


def rectangle(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class JumpReLUFunction(torch.autograd.Function):
    """Forward pre * (pre > theta). Backward: d/dpre = 1 where active; d/dtheta = -(theta / eps) K((pre -
    theta) / eps) (paper eq. 11), summed over the batch."""

    @staticmethod
    def forward(ctx: Any, pre: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return pre * (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = (pre > theta).to(grad.dtype) * grad
        grad_theta = -(theta / eps) * rectangle((pre - theta) / eps) * grad
        return grad_pre, grad_theta.sum(0).to(theta.dtype), None


class StepFunction(torch.autograd.Function):
    """Forward H(pre - theta). Backward: no gradient to pre; d/dtheta = -(1 / eps) K((pre - theta) / eps)
    (paper eq. 12), summed over the batch."""

    @staticmethod
    def forward(ctx: Any, pre: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor, None]:
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_theta = -(1.0 / eps) * rectangle((pre - theta) / eps) * grad
        return None, grad_theta.sum(0).to(theta.dtype), None


class JumpReLUWithL0(torch.autograd.Function):
    """``JumpReLUFunction`` and ``StepFunction(...).sum(-1).mean()`` in one pass: returns (f, l0) with
    f = pre * H(pre - theta) (computed in place in ``pre``, which the caller must not reuse) and l0 the mean
    count of active latents per token. Gradients equal those of the two separate functions
    (tests/sae/test_sae_speed_paths.py); what makes it cheaper than they are:

    - it saves the bool ``active`` mask and the flat indices of the rectangle window's entries (a few % of
      them), not the float pre-activations;
    - the window's per-latent sums (of grad_f, and its counts) are ``bincount``s over those indices: a sum of
      a full-size bool or masked tensor over tokens costs a 256 MB int64 copy on CPU, the bincount ~10 ms;
    - counts of the active mask use ``count_nonzero`` (no int64 copy either).

    Pass theta in float32 even when pre is bf16 (autocast): comparisons then run in float32, while a
    bf16-rounded theta (~0.4% steps) shifts L0 by ~1%."""

    @staticmethod
    def forward(
        ctx: Any, pre: torch.Tensor, theta: torch.Tensor, bandwidth: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        active = pre > theta
        window = pre > theta - 0.5 * bandwidth  # rectangle((pre - theta) / eps) != 0
        window &= pre < theta + 0.5 * bandwidth
        in_window = window.view(-1).nonzero().squeeze(1)
        l0 = torch.count_nonzero(active).to(torch.float32) / pre.shape[0]
        f = pre.mul_(active)
        ctx.mark_dirty(pre)
        ctx.save_for_backward(active, in_window, theta)
        ctx.bandwidth = bandwidth
        return f, l0

    @staticmethod
    def backward(ctx: Any, grad_f: torch.Tensor, grad_l0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        active, in_window, theta = ctx.saved_tensors
        (n, d_sae), eps = active.shape, ctx.bandwidth
        grad_pre = torch.where(active, grad_f, 0)
        # f: -(theta / eps) K * grad_f; l0 = mean_i sum_j H: -(1 / eps) K * grad_l0 / n; both summed over tokens
        acc = torch.promote_types(theta.dtype, torch.float32)  # sums in float32 at least, even under bf16
        latent = in_window % d_sae
        windowed = torch.bincount(latent, weights=grad_f.reshape(-1)[in_window].to(acc), minlength=d_sae)
        counts = torch.bincount(latent, minlength=d_sae)
        grad_theta = -(theta.to(acc) * windowed.to(acc) + counts.to(acc) * (grad_l0.to(acc) / n)) / eps
        return grad_pre, grad_theta.to(theta.dtype), None


class JumpReLUParams(SAEParams):
    sparsity_coefficient: float = Field(1e-3, ge=0, description="lambda: weight of the L0 penalty (mean over tokens)")
    sparsity_warmup_tokens: int = Field(0, ge=0, description="tokens over which lambda ramps linearly from 0")
    threshold_init: float = Field(0.1, ge=0, description="initial theta for every latent (scaled units)")
    bandwidth: float = Field(0.05, gt=0, description="epsilon: width of the rectangle kernel of the STE")


class JumpReLUSAE(SAE):
    """pre = (x - b_dec) W_enc + b_enc; f = ReLU(pre) * (pre > theta); x_hat = f W_dec + b_dec;
    loss = ||x - x_hat||^2 + lambda * ||f||_0. Unit-norm decoder rows, as in the paper; theta is trained
    directly and kept >= 0 by projection (as SAELens; a log-parameterised theta barely moves under Adam)."""

    name = "jumprelu"
    description = (
        "JumpReLU SAE (Rajamanoharan et al. 2024): per-latent threshold, STE with rectangle kernel, L0 penalty"
    )
    Params = JumpReLUParams
    saelens_architectures = ("jumprelu",)
    unit_norm_decoder = True
    params: JumpReLUParams

    def __init__(self, d_in: int, params: JumpReLUParams, *, seed: int = 0):
        super().__init__(d_in, params.latents(d_in), params)
        self.threshold = torch.nn.Parameter(torch.full((self.d_sae,), params.threshold_init))
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.long))
        self.init_tied(seed)

    @classmethod
    def from_saelens(cls, cfg: Mapping[str, Any], extra: dict[str, torch.Tensor]) -> SAELensImport:
        if "threshold" not in extra:
            raise SAEFormatError("jumprelu SAE without a threshold tensor")
        return SAELensImport(cls.saelens_params(cfg), {"threshold": extra.pop("threshold")})

    def to_saelens(self) -> SAELensExport:
        return SAELensExport({"architecture": "jumprelu"}, {"threshold": self.threshold.detach()})

    def _pre(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def encode_scaled(self, x: torch.Tensor) -> torch.Tensor:
        pre = self._pre(x)
        return pre.relu() * (pre > self.threshold).to(pre.dtype)

    def decode_scaled(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec

    def sparsity_weight(self, batch: int) -> float:
        warmup = self.params.sparsity_warmup_tokens
        share = 1.0 if warmup == 0 else min(1.0, (int(self.tokens_seen) + batch) / warmup)
        return self.params.sparsity_coefficient * share

    def training_loss(self, x: torch.Tensor) -> TrainStep:
        """Dense like ReLU: five full-size matmuls (``training_preactivations``), and the JumpReLU with its L0
        penalty fused into one autograd function (``JumpReLUWithL0``)."""
        with torch.no_grad():
            self.threshold.clamp_(min=0.0)
        x = x * self.norm_scale
        pre = self.training_preactivations(x)
        f, l0 = JumpReLUWithL0.apply(pre, self.threshold, self.params.bandwidth)  # theta stays float32
        x_hat = torch.addmm(self.b_dec, f, self.W_dec)
        mse = (x_hat - x).pow(2).sum(-1).mean()
        weight = self.sparsity_weight(x.shape[0])
        self.tokens_seen.add_(x.shape[0])
        parts = {"mse": mse.item(), "l0": l0.item(), "sparsity_weight": weight}
        return TrainStep(mse + weight * l0, x_hat.detach() / self.norm_scale, f.detach(), parts)


@hookimpl
def register_sae_architectures(register: Callable[[type[JumpReLUSAE]], None]) -> None:
    register(JumpReLUSAE)
