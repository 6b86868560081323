"""TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"): keep the k largest encoder
pre-activations per token, with an AuxK loss that lets dead latents learn to explain the residual."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field

from saex import (
    SAE,
    SAELensExport,
    SAELensImport,
    SAEParams,
    SparseLatentDecode,
    SparsePattern,
    TrainStep,
    hookimpl,
    latents_fired,
)


class TopKParams(SAEParams):
    k: int = Field(32, gt=0, description="active latents per token")
    aux_k: int | None = Field(None, gt=0, description="dead latents used by AuxK; default d_in // 2")
    aux_coefficient: float = Field(1 / 32, ge=0)
    dead_steps_threshold: int = Field(
        100, gt=0, description="optimizer steps without firing after which a latent counts as dead for AuxK"
    )


class TopKSAE(SAE):
    """f = scatter(ReLU(topk((x - b_dec) W_enc + b_enc))); x_hat = f W_dec + b_dec, decoded sparsely."""

    name = "topk"
    description = "TopK SAE (Gao et al. 2024) with AuxK loss on dead latents and unit-norm decoder rows"
    Params = TopKParams
    saelens_architectures = ("topk",)
    unit_norm_decoder = True
    params: TopKParams

    def __init__(self, d_in: int, params: TopKParams, *, seed: int = 0):
        d_sae = params.latents(d_in)
        if params.k > d_sae:
            raise ValueError(f"{self.name}: k={params.k} exceeds d_sae={d_sae}")
        super().__init__(d_in, d_sae, params)
        self.k = params.k
        self.aux_k = params.aux_k or max(d_in // 2, 1)
        self.track_dead_latents()
        self.init_tied(seed)

    @classmethod
    def from_saelens(cls, cfg: Mapping[str, Any], extra: dict[str, torch.Tensor]) -> SAELensImport | None:
        """SAELens's ``topk``; its ``rescale_acts_by_decoder_norm`` arrives folded into the weights."""
        return SAELensImport(cls.saelens_params(cfg, k=int(cfg["k"])))

    def to_saelens(self) -> SAELensExport:
        return SAELensExport({"architecture": "topk", "k": int(self.params.k), "rescale_acts_by_decoder_norm": False})

    def _pre(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def _topk(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        top = pre.topk(self.k, dim=-1, sorted=False)
        return top.values.relu(), top.indices

    def _densify(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return values.new_zeros(values.shape[0], self.d_sae).scatter_(-1, indices, values)

    def _decode_sparse(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """sum_j values[:, j] * W_dec[indices[:, j]] without forming the dense f @ W_dec (about 10x faster)."""
        return F.embedding_bag(indices, self.W_dec, per_sample_weights=values.to(self.W_dec.dtype), mode="sum")

    def encode_scaled(self, x: torch.Tensor) -> torch.Tensor:
        return self._densify(*self._topk(self._pre(x)))

    def decode_scaled(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec

    def forward_scaled(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values, indices = self._topk(self._pre(x))
        return self._decode_sparse(values, indices) + self.b_dec, self._densify(values, indices)

    def training_loss(self, x: torch.Tensor) -> TrainStep:
        """Only the encoder forward is dense: the top-k selection runs on pre-activations computed without
        gradients, and ``SparseLatentDecode`` decodes and backpropagates through the k selected latents."""
        x = x * self.norm_scale
        with torch.no_grad():
            pre = torch.addmm(self.b_enc, x - self.b_dec, self.W_enc)  # the bias add fused into the matmul
            values, indices = pre.topk(self.k, dim=-1, sorted=False)
            pattern, order = SparsePattern.per_token(indices, self.d_sae)
            values = values.gather(-1, order).flatten()
        return self._sparse_step(x, pre, pattern, values)

    def _sparse_step(
        self, x: torch.Tensor, pre: torch.Tensor, pattern: SparsePattern, values: torch.Tensor
    ) -> TrainStep:
        """Decode the selected pre-activations ``values`` at ``pattern`` and add the AuxK loss; ``x`` scaled,
        ``pre`` the batch's pre-activations (no gradient)."""
        out, acts = SparseLatentDecode.apply(values, x, self.b_dec, self.W_enc, self.b_enc, self.W_dec, pattern)
        x_hat = out + self.b_dec
        return self._loss_with_auxk(x, x_hat, pre, pattern.csr(acts), latents_fired(pattern.cols, acts, self.d_sae))

    def _loss_with_auxk(
        self, x: torch.Tensor, x_hat: torch.Tensor, pre: torch.Tensor, f: torch.Tensor, fired: torch.Tensor
    ) -> TrainStep:
        """MSE (summed over dimensions, mean over tokens) + aux_coefficient * AuxK; updates the dead counters.
        ``x`` and ``x_hat`` are scaled; ``f`` (dense or sparse CSR) carries no gradient; ``fired`` bool [d_sae]."""
        mse = (x_hat - x).pow(2).sum(-1).mean()
        dead = self.dead_latents(self.params.dead_steps_threshold)
        auxk = self._auxk_loss(x, pre, dead, (x - x_hat).detach())
        self.mark_fired(fired)
        loss = mse + self.params.aux_coefficient * auxk
        parts = {"mse": mse.item(), "auxk": auxk.item()}
        return TrainStep(loss, x_hat.detach() / self.norm_scale, f, parts)

    def _auxk_loss(
        self, x: torch.Tensor, pre: torch.Tensor, dead: torch.Tensor, residual: torch.Tensor
    ) -> torch.Tensor:
        """Reconstruct the main loss's residual from the top-aux_k dead latents; scaled down while few
        latents are dead (as in EleutherAI's sae and SAELens). Sparse like the main path: the top-k runs over
        the dead columns of ``pre`` only, and gradients reach only the selected latents."""
        n_dead = int(dead.sum())
        if n_dead == 0:
            return x.new_zeros((), dtype=torch.float32)
        aux_k = min(self.aux_k, n_dead)
        with torch.no_grad():
            dead_index = dead.nonzero().squeeze(-1)
            top = pre.index_select(-1, dead_index).topk(aux_k, dim=-1, sorted=False)
            pattern, order = SparsePattern.per_token(dead_index[top.indices], self.d_sae)
            values = top.values.gather(-1, order).flatten()
        e_hat, _ = SparseLatentDecode.apply(values, x, self.b_dec, self.W_enc, self.b_enc, self.W_dec, pattern)
        return min(n_dead / self.aux_k, 1.0) * (e_hat - residual).pow(2).sum(-1).mean()


@hookimpl
def register_sae_architectures(register: Callable[[type[TopKSAE]], None]) -> None:
    register(TopKSAE)
