"""The SAE base class every architecture plugin builds on, and the on-disk format (``cfg.json`` +
``sae_weights.safetensors``, parameter names as in SAELens).

An SAE works internally on *scaled* inputs ``x * norm_scale`` (input normalisation, 1.0 = off); the public
``encode``/``decode``/``forward`` take and return activations in the model's own units, so callers (metrics,
splicing) never see the scale. Latents ``f`` live in the scaled space.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Iterator, Literal, Mapping

import torch
from pydantic import BaseModel, Field, ValidationError
from safetensors.torch import load_file, save_file

from harness import __version__
from harness.protocols import ActivationSource, SAEArchitecture

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
NORM_ESTIMATE_TOKENS = 100_000


class SAEParams(BaseModel):
    """Params every built-in architecture shares; an architecture's ``Params`` subclasses this."""

    model_config = {"extra": "forbid"}

    d_sae: int | None = Field(None, gt=0, description="number of latents; default expansion_factor * d_in")
    expansion_factor: int = Field(8, gt=0)
    normalize_input: bool = Field(True, description="scale inputs to mean norm sqrt(d_in) (stored, undone on decode)")
    b_dec_init: Literal["mean", "zero"] = Field("mean", description="b_dec at start of training")

    def latents(self, d_in: int) -> int:
        return self.d_sae or self.expansion_factor * d_in


@dataclass
class TrainStep:
    """One training step's output: ``loss`` to backpropagate, ``x_hat`` in model units, latents ``f``
    [n, d_sae], and ``parts`` (named loss components as floats, for logging)."""

    loss: torch.Tensor
    x_hat: torch.Tensor
    f: torch.Tensor
    parts: dict[str, float]


class SAE(torch.nn.Module):
    """Base of every architecture: holds ``W_enc [d_in, d_sae]``, ``b_enc``, ``W_dec [d_sae, d_in]``, ``b_dec``
    and the ``norm_scale`` buffer. Subclasses implement ``encode_scaled``, ``decode_scaled`` and
    ``training_loss``; set ``unit_norm_decoder`` to keep decoder rows at unit norm during training."""

    architecture: ClassVar[str]
    unit_norm_decoder: ClassVar[bool] = False

    def __init__(self, d_in: int, d_sae: int, params: BaseModel):
        super().__init__()
        self.d_in, self.d_sae, self.params = d_in, d_sae, params
        self.W_enc = torch.nn.Parameter(torch.zeros(d_in, d_sae))
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae))
        self.W_dec = torch.nn.Parameter(torch.zeros(d_sae, d_in))
        self.b_dec = torch.nn.Parameter(torch.zeros(d_in))
        self.register_buffer("norm_scale", torch.tensor(1.0))

    # --- subclass surface (scaled units) ------------------------------------------------------------------

    def encode_scaled(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode_scaled(self, f: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_scaled(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Override when the architecture can decode faster than ``decode_scaled(encode_scaled(x))``."""
        f = self.encode_scaled(x)
        return self.decode_scaled(f), f

    def training_loss(self, x: torch.Tensor) -> TrainStep:
        """Loss on a batch ``x`` in model units. Called exactly once per optimizer step: it may update
        training state (e.g. dead-latent counters)."""
        raise NotImplementedError

    # --- public API (model units) ------------------------------------------------------------------------

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_scaled(x * self.norm_scale)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return self.decode_scaled(f) / self.norm_scale

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_hat, f = self.forward_scaled(x * self.norm_scale)
        return x_hat / self.norm_scale, f

    # --- training hooks ----------------------------------------------------------------------------------

    def normalizes_input(self) -> bool:
        """Architectures opt into input normalisation with a boolean ``normalize_input`` param."""
        return bool(getattr(self.params, "normalize_input", False))

    @torch.no_grad()
    def init_from_data(self, source: ActivationSource) -> None:
        """Data-dependent initialisation, run by the trainer before the first step: input normalisation, then
        b_dec at the mean scaled input when ``params.b_dec_init == "mean"`` (Gao et al. use the geometric
        median; the mean is cheaper and close enough for centring)."""
        if self.normalizes_input():
            self.fit_normalisation(source)
        if getattr(self.params, "b_dec_init", "zero") == "mean":
            self.b_dec.copy_(mean_activation(source).to(self.b_dec) * self.norm_scale)

    def after_training(self, source: ActivationSource, batch_size: int) -> None:
        """Run by the trainer once after the last step, in eval mode without gradients: fit what inference
        needs beyond the weights (e.g. BatchTopK's threshold)."""

    @torch.no_grad()
    def init_tied(self, seed: int, norm: float = 1.0) -> None:
        """Decoder rows random directions of norm ``norm``, encoder its transpose, biases zero (Gao et al. A.1;
        Anthropic's April 2024 update uses the same tied start)."""
        w = torch.randn(self.d_sae, self.d_in, generator=torch.Generator().manual_seed(seed))
        self.W_dec.copy_(w / w.norm(dim=-1, keepdim=True) * norm)
        self.W_enc.copy_(self.W_dec.T)

    @torch.no_grad()
    def fit_normalisation(self, source: ActivationSource) -> None:
        """Set ``norm_scale`` so scaled inputs have mean norm sqrt(d_in), as SAELens's
        ``expected_average_only_in`` does; hyperparameters (lr, init) then transfer across models and layers."""
        total, count = 0.0, 0
        for batch in sample_batches(source):
            total += batch.double().norm(dim=-1).sum().item()
            count += batch.shape[0]
        mean_norm = total / max(count, 1)
        if not math.isfinite(mean_norm) or mean_norm <= 0:
            raise ValueError(f"cannot normalise inputs: mean activation norm is {mean_norm}")
        self.norm_scale.fill_(math.sqrt(self.d_in) / mean_norm)

    # --- dead-latent tracking (for AuxK and similar losses) ------------------------------------------------

    def track_dead_latents(self) -> None:
        """Call in ``__init__``: keeps per-latent optimizer steps since the latent last fired in the buffer
        ``steps_since_fired`` (so checkpoints carry it)."""
        self.register_buffer("steps_since_fired", torch.zeros(self.d_sae, dtype=torch.long))

    @torch.no_grad()
    def mark_fired(self, fired: torch.Tensor) -> None:
        """Once per training step; ``fired``: bool [d_sae], latents that fired on the batch."""
        self.steps_since_fired.add_(1).masked_fill_(fired, 0)

    def dead_latents(self, threshold: int) -> torch.Tensor:
        """Bool [d_sae]: latents that have not fired for ``threshold`` steps."""
        return self.steps_since_fired >= threshold

    @torch.no_grad()
    def before_step(self) -> None:
        """Run between ``backward`` and ``optimizer.step``: with unit-norm decoders, drop the gradient
        component parallel to each decoder row so the step does not fight the renormalisation."""
        if self.unit_norm_decoder and self.W_dec.grad is not None:
            parallel = (self.W_dec.grad * self.W_dec).sum(-1, keepdim=True)
            self.W_dec.grad.sub_(parallel * self.W_dec)

    @torch.no_grad()
    def after_step(self) -> None:
        """Run after ``optimizer.step``: with unit-norm decoders, renormalise the rows (zero rows stay zero)."""
        if self.unit_norm_decoder:
            self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12))


def mean_activation(source: ActivationSource) -> torch.Tensor:
    """Mean input (float64, model units) over ``sample_batches``."""
    total, count = torch.zeros(source.d_in, dtype=torch.float64), 0
    for batch in sample_batches(source):
        total += batch.double().sum(0)
        count += batch.shape[0]
    return total / max(count, 1)


def sample_batches(
    source: ActivationSource, max_tokens: int = NORM_ESTIMATE_TOKENS, *, batch_size: int = 4096
) -> Iterator[torch.Tensor]:
    """About ``max_tokens`` tokens in a fixed shuffled order, for data-dependent initialisation (the first
    tokens of a corpus are not representative)."""
    count = 0
    for batch in source.iter_batches(batch_size, shuffle=True, seed=0):
        yield batch
        count += batch.shape[0]
        if count >= max_tokens:
            return


# --- on-disk format ----------------------------------------------------------------------------------------


class SAEFormatError(ValueError):
    """A saved SAE that cannot be read: names the file and what is wrong with it."""


class SAEConfigFile(BaseModel):
    """Schema of ``cfg.json``; ``norm_scale`` is informative (the weights file holds the exact value)."""

    model_config = {"extra": "forbid"}

    architecture: str
    d_in: int
    d_sae: int
    params: dict[str, object]
    norm_scale: float
    dtype: str
    saex_version: str


def save_sae(sae: SAE, directory: str | Path) -> Path:
    """Write ``cfg.json`` and ``sae_weights.safetensors`` into ``directory`` (created if missing)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = SAEConfigFile(
        architecture=sae.architecture,
        d_in=sae.d_in,
        d_sae=sae.d_sae,
        params=sae.params.model_dump(mode="json"),
        norm_scale=float(sae.norm_scale),
        dtype=str(sae.W_dec.dtype).removeprefix("torch."),
        saex_version=__version__,
    )
    (directory / CFG_FILE).write_text(cfg.model_dump_json(indent=2) + "\n")
    state = {name: t.detach().cpu().contiguous() for name, t in sae.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE))
    return directory


def load_sae(directory: str | Path, architectures: Mapping[str, SAEArchitecture]) -> SAE:
    """Rebuild a saved SAE with its architecture plugin and load its weights strictly (bit-exact), on CPU."""
    directory = Path(directory)
    cfg = _read_cfg(directory / CFG_FILE)
    arch = architectures.get(cfg.architecture)
    if arch is None:
        valid = ", ".join(sorted(architectures)) or "(none registered)"
        raise SAEFormatError(
            f"{directory / CFG_FILE}: unknown SAE architecture {cfg.architecture!r}; valid: {valid}"
        )
    try:
        params = arch.Params.model_validate(cfg.params)
    except ValidationError as e:
        raise SAEFormatError(f"{directory / CFG_FILE}: invalid params for {cfg.architecture!r}: {e}") from e
    sae = arch.build(cfg.d_in, params)
    if sae.d_sae != cfg.d_sae:
        raise SAEFormatError(f"{directory / CFG_FILE}: d_sae {cfg.d_sae} but params build {sae.d_sae}")
    dtype = getattr(torch, cfg.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise SAEFormatError(f"{directory / CFG_FILE}: unknown dtype {cfg.dtype!r}")
    sae.to(dtype)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise SAEFormatError(f"{weights}: missing")
    sae.load_state_dict(load_file(str(weights)), strict=True)
    return sae


def _read_cfg(path: Path) -> SAEConfigFile:
    try:
        return SAEConfigFile.model_validate_json(path.read_text())
    except FileNotFoundError as e:
        raise SAEFormatError(f"{path}: missing (not a saved saex SAE directory?)") from e
    except ValidationError as e:
        raise SAEFormatError(f"{path}: invalid SAE config: {e}") from e
