"""Standard ReLU SAE with an L1 penalty (Bricken et al. 2023, with Anthropic's April 2024 update): the L1
term weights each latent by its decoder-row norm, so shrinking f while growing W_dec does not pay, and the
penalty ramps up linearly over a warm-up so latents can form before sparsity bites."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from pydantic import Field

from saex import SAE, SAELensExport, SAELensImport, SAEParams, TrainStep, hookimpl


class ReLUParams(SAEParams):
    l1_coefficient: float = Field(5.0, ge=0, description="weight of sum_j f_j * ||W_dec_j|| (scaled units)")
    l1_warmup_tokens: int = Field(0, ge=0, description="tokens over which the L1 weight ramps linearly from 0")
    decoder_init_norm: float = Field(0.1, gt=0, description="norm of the initial decoder rows (W_enc = W_dec.T)")


class ReLUSAE(SAE):
    """f = ReLU((x - b_dec) W_enc + b_enc); x_hat = f W_dec + b_dec; loss = ||x - x_hat||^2
    + l1 * warmup * sum_j f_j ||W_dec_j||. SAELens's ``standard`` architecture."""

    name = "relu"
    description = "ReLU SAE with decoder-norm-weighted L1 and L1 warm-up (SAELens 'standard')"
    Params = ReLUParams
    saelens_architectures = ("standard",)
    params: ReLUParams

    def __init__(self, d_in: int, params: ReLUParams, *, seed: int = 0):
        super().__init__(d_in, params.latents(d_in), params)
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.long))
        self.init_tied(seed, norm=params.decoder_init_norm)

    @classmethod
    def from_saelens(cls, cfg: Mapping[str, Any], extra: dict[str, torch.Tensor]) -> SAELensImport:
        return SAELensImport(cls.saelens_params(cfg))

    def to_saelens(self) -> SAELensExport:
        return SAELensExport({"architecture": "standard"})

    def _pre(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def encode_scaled(self, x: torch.Tensor) -> torch.Tensor:
        return self._pre(x).relu()

    def decode_scaled(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec

    def l1_weight(self, batch: int) -> float:
        """The L1 coefficient for the step that brings ``tokens_seen`` to ``tokens_seen + batch`` (as SAELens's
        coefficient warm-up: the first step already gets a non-zero share)."""
        warmup = self.params.l1_warmup_tokens
        share = 1.0 if warmup == 0 else min(1.0, (int(self.tokens_seen) + batch) / warmup)
        return self.params.l1_coefficient * share

    def training_loss(self, x: torch.Tensor) -> TrainStep:
        """Five [n, d_in] x [d_in, d_sae]-sized matmuls per step and no more (the FLOP bound of a dense SAE;
        see ``training_preactivations``); the ReLU runs in place; the L1 is ``(sum_i f_i) . ||W_dec||``
        without a weighted [n, d_sae] temporary."""
        x = x * self.norm_scale
        f = self.training_preactivations(x).relu_()
        x_hat = torch.addmm(self.b_dec, f, self.W_dec)
        mse = (x_hat - x).pow(2).sum(-1).mean()
        l1 = f.sum(0, dtype=self.W_dec.dtype) @ self.W_dec.norm(dim=-1) / x.shape[0]
        weight = self.l1_weight(x.shape[0])
        self.tokens_seen.add_(x.shape[0])
        parts = {"mse": mse.item(), "l1": l1.item(), "l1_weight": weight}
        return TrainStep(mse + weight * l1, x_hat.detach() / self.norm_scale, f.detach(), parts)


@hookimpl
def register_sae_architectures(register: Callable[[type[ReLUSAE]], None]) -> None:
    register(ReLUSAE)
