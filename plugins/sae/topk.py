"""TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"): keep the k largest encoder
pre-activations per token, with an AuxK loss that lets dead latents learn to explain the residual."""

from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field

from harness.protocols import ActivationSource
from harness.sae import SAE, TrainStep, sample_batches
from harness.spec import hookimpl


class TopKParams(BaseModel):
    model_config = {"extra": "forbid"}

    d_sae: int | None = Field(None, gt=0, description="number of latents; default expansion_factor * d_in")
    expansion_factor: int = Field(8, gt=0)
    k: int = Field(32, gt=0, description="active latents per token")
    aux_k: int | None = Field(None, gt=0, description="dead latents used by AuxK; default d_in // 2")
    aux_coefficient: float = Field(1 / 32, ge=0)
    dead_steps_threshold: int = Field(
        100, gt=0, description="optimizer steps without firing after which a latent counts as dead for AuxK"
    )
    normalize_input: bool = True
    b_dec_init: Literal["mean", "zero"] = Field("mean", description="b_dec at start of training")


class TopKSAE(SAE):
    """f = scatter(ReLU(topk((x - b_dec) W_enc + b_enc))); x_hat = f W_dec + b_dec, decoded sparsely."""

    architecture = "topk"
    unit_norm_decoder = True
    params: TopKParams

    def __init__(self, d_in: int, params: TopKParams, *, seed: int = 0):
        d_sae = params.d_sae or params.expansion_factor * d_in
        if params.k > d_sae:
            raise ValueError(f"topk: k={params.k} exceeds d_sae={d_sae}")
        super().__init__(d_in, d_sae, params)
        self.k = params.k
        self.aux_k = params.aux_k or max(d_in // 2, 1)
        self.register_buffer("steps_since_fired", torch.zeros(d_sae, dtype=torch.long))
        self._init_tied(seed)

    @torch.no_grad()
    def _init_tied(self, seed: int) -> None:
        """Unit-norm random decoder rows and the encoder as its transpose (Gao et al. A.1)."""
        w = torch.randn(self.d_sae, self.d_in, generator=torch.Generator().manual_seed(seed))
        self.W_dec.copy_(w / w.norm(dim=-1, keepdim=True))
        self.W_enc.copy_(self.W_dec.T)

    def _pre(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def _topk(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        top = pre.topk(self.k, dim=-1, sorted=False)
        return top.values.relu(), top.indices

    def _densify(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return values.new_zeros(values.shape[0], self.d_sae).scatter_(-1, indices, values)

    def _decode_sparse(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """sum_j values[:, j] * W_dec[indices[:, j]] without forming the dense f @ W_dec (about 10x faster)."""
        return F.embedding_bag(indices, self.W_dec, per_sample_weights=values, mode="sum")

    def encode_scaled(self, x: torch.Tensor) -> torch.Tensor:
        return self._densify(*self._topk(self._pre(x)))

    def decode_scaled(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec

    def forward_scaled(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values, indices = self._topk(self._pre(x))
        return self._decode_sparse(values, indices) + self.b_dec, self._densify(values, indices)

    def training_loss(self, x: torch.Tensor) -> TrainStep:
        x = x * self.norm_scale
        pre = self._pre(x)
        values, indices = self._topk(pre)
        x_hat = self._decode_sparse(values, indices) + self.b_dec
        mse = (x_hat - x).pow(2).sum(-1).mean()
        dead = self.steps_since_fired >= self.params.dead_steps_threshold
        auxk = self._auxk_loss(pre, dead, (x - x_hat).detach())
        self._update_fired(values, indices)
        loss = mse + self.params.aux_coefficient * auxk
        parts = {"mse": mse.item(), "auxk": auxk.item()}
        return TrainStep(loss, x_hat.detach() / self.norm_scale, self._densify(values, indices).detach(), parts)

    def _auxk_loss(self, pre: torch.Tensor, dead: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Reconstruct the main loss's residual from the top-aux_k dead latents; scaled down while few
        latents are dead (as in EleutherAI's sae and SAELens)."""
        n_dead = int(dead.sum())
        if n_dead == 0:
            return pre.new_zeros(())
        aux_k = min(self.aux_k, n_dead)
        top = pre.masked_fill(~dead, float("-inf")).topk(aux_k, dim=-1, sorted=False)
        e_hat = self._decode_sparse(top.values.relu(), top.indices)
        return min(n_dead / self.aux_k, 1.0) * (e_hat - residual).pow(2).sum(-1).mean()

    @torch.no_grad()
    def _update_fired(self, values: torch.Tensor, indices: torch.Tensor) -> None:
        fired = (values > 0).flatten().long()
        hits = torch.zeros_like(self.steps_since_fired).scatter_add_(0, indices.flatten(), fired)
        self.steps_since_fired.add_(1).masked_fill_(hits > 0, 0)

    @torch.no_grad()
    def init_from_data(self, source: ActivationSource) -> None:
        """Besides normalisation, start b_dec at the mean scaled input (Gao et al. use the geometric median;
        the mean is cheaper and close enough for centring)."""
        super().init_from_data(source)
        if self.params.b_dec_init == "mean":
            self.b_dec.copy_(_mean(source).to(self.b_dec) * self.norm_scale)


def _mean(source: ActivationSource) -> torch.Tensor:
    total, count = torch.zeros(source.d_in, dtype=torch.float64), 0
    for batch in sample_batches(source):
        total += batch.double().sum(0)
        count += batch.shape[0]
    return total / max(count, 1)


class TopK:
    name = "topk"
    description = "TopK SAE (Gao et al. 2024) with AuxK loss on dead latents and unit-norm decoder rows"
    Params = TopKParams

    def build(self, d_in: int, params: TopKParams, *, seed: int = 0) -> TopKSAE:
        return TopKSAE(d_in, params, seed=seed)


@hookimpl
def register_sae_architectures(register: Callable[[TopK], None]) -> None:
    register(TopK())
