"""The SAE base class every architecture plugin builds on, and the on-disk format (``cfg.json`` +
``sae_weights.safetensors``, parameter names as in SAELens).

An SAE works internally on *scaled* inputs ``x * norm_scale`` (input normalisation, 1.0 = off); the public
``encode``/``decode``/``forward`` take and return activations in the model's own units, so callers (metrics,
splicing) never see the scale. Latents ``f`` live in the scaled space. An SAE read from OpenAI's TopK checkpoints
(or SAELens's ``normalize_activations = layer_norm``) also normalises each token (``layer_norm``, see
``SAE.normalise``).

Dtype: an SAE computes in its weights' dtype, as SAELens does (its ``process_sae_in`` casts the input to
``cfg.dtype``): ``encode``, ``decode`` and ``forward`` cast what they are given to it, so a bfloat16 SAE takes
float32 activations. ``encode`` and ``decode`` return that dtype (SAELens's numbers); ``forward`` returns the
reconstruction in the input's dtype (it stands in for the input) and the latents in the SAE's.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

import torch
from pydantic import BaseModel, Field, ValidationError
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from saex._version import __version__
from saex.plugin.protocols import ActivationSource, SAEArchitecture

# The sparse training path uses CSR tensors, which torch still labels "beta" with a warning on first use.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state", category=UserWarning)

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
NORM_ESTIMATE_TOKENS = 100_000
LAYER_NORM_EPS = 1e-5  # OpenAI's ``LN``: (x - mean) / (std + eps), std unbiased


class SAEParams(BaseModel):
    """Params every built-in architecture shares; an architecture's ``Params`` subclasses this."""

    model_config = {"extra": "forbid"}

    d_sae: int | None = Field(None, gt=0, description="number of latents; default expansion_factor * d_in")
    expansion_factor: int = Field(8, gt=0)
    normalize_input: bool = Field(True, description="scale inputs to mean norm sqrt(d_in) (stored, undone on decode)")
    b_dec_init: Literal["mean", "zero"] = Field("mean", description="b_dec at start of training")

    def latents(self, d_in: int) -> int:
        return self.d_sae or self.expansion_factor * d_in


class TrainStep:
    """One training step's output: ``loss`` to backpropagate, ``x_hat`` in model units, latents ``f``
    [n, d_sae], and ``parts`` (named loss components as floats, for logging).

    ``f`` may be given as a sparse CSR tensor (sparse architectures: densifying [n, d_sae] costs as much as
    the rest of their step); the ``f`` attribute then densifies on first access, while the trainer reads
    only ``activity()``, which works on either layout without densifying."""

    def __init__(self, loss: torch.Tensor, x_hat: torch.Tensor, f: torch.Tensor, parts: dict[str, float]):
        self.loss, self.x_hat, self.parts = loss, x_hat, parts
        self._f = f

    @property
    def f(self) -> torch.Tensor:
        if self._f.layout != torch.strided:
            self._f = self._f.to_dense()
        return self._f

    def activity(self) -> tuple[float, torch.Tensor]:
        """(mean number of non-zero latents per token, bool [d_sae] latents non-zero on some token), from
        either layout without densifying."""
        f = self._f
        if f.layout == torch.sparse_csr:
            values = f.values()
            l0 = (values != 0).sum().item() / max(f.shape[0], 1)
            return l0, latents_fired(f.col_indices(), values, f.shape[1])
        active = f != 0  # count_nonzero: a bool .sum() copies the whole mask to int64 first
        return torch.count_nonzero(active).item() / max(f.shape[0], 1), active.any(0)


def latents_fired(cols: torch.Tensor, values: torch.Tensor, d_sae: int) -> torch.Tensor:
    """Bool [d_sae]: latents with a non-zero value among sparse entries (``cols``, ``values``)."""
    fired = torch.zeros(d_sae, dtype=torch.bool, device=cols.device)
    return fired.index_fill_(0, cols[values != 0], True)


@dataclass
class SAELensImport:
    """What an architecture reads from a SAELens file: its ``Params`` fields and the ``state_dict`` entries
    beyond ``W_enc``, ``b_enc``, ``W_dec``, ``b_dec`` (e.g. ``threshold``)."""

    params: dict[str, Any]
    state: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class SAELensExport:
    """How an SAE is written for SAELens beyond the four weights (which the writer folds and saves): cfg.json
    fields (at least SAELens's ``architecture``), extra tensors and ``metadata`` entries."""

    cfg: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)


class SAE(torch.nn.Module):
    """Base of every architecture: holds ``W_enc [d_in, d_sae]``, ``b_enc``, ``W_dec [d_sae, d_in]``, ``b_dec``
    and the ``norm_scale`` buffer. Subclasses implement ``encode_scaled``, ``decode_scaled`` and
    ``training_loss``; set ``unit_norm_decoder`` to keep decoder rows at unit norm during training.

    An architecture is registered as its subclass (``register(TopKSAE)``), which sets the class attributes
    ``name`` (also the ``architecture`` in cfg.json, so the registry name is the one a saved SAE is read back
    with), ``description`` and ``Params``, and takes ``(d_in, params, *, seed)`` in its constructor (``build``).
    SAELens interop is opt-in: list the SAELens architectures it reads in ``saelens_architectures`` and implement
    ``from_saelens`` / ``to_saelens`` (``saex.sae.saelens`` asks the registered classes)."""

    name: ClassVar[str]
    description: ClassVar[str]
    Params: ClassVar[type[BaseModel]]
    saelens_architectures: ClassVar[tuple[str, ...]] = ()
    unit_norm_decoder: ClassVar[bool] = False

    def __init__(self, d_in: int, d_sae: int, params: BaseModel):
        super().__init__()
        self.d_in, self.d_sae, self.params = d_in, d_sae, params
        self.W_enc = torch.nn.Parameter(torch.zeros(d_in, d_sae))
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae))
        self.W_dec = torch.nn.Parameter(torch.zeros(d_sae, d_in))
        self.b_dec = torch.nn.Parameter(torch.zeros(d_in))
        self.register_buffer("norm_scale", torch.tensor(1.0))
        # per-token layer norm of the input (``normalise``): set only by readers of files that use one, and
        # a buffer so that copies, pruned SAEs and saved files keep it
        self.register_buffer("layer_norm", torch.tensor(False))

    @classmethod
    def build(cls, d_in: int, params: BaseModel, *, seed: int = 0) -> Self:
        """A freshly initialised SAE for inputs of width ``d_in`` (seeded initialisation)."""
        return cls(d_in, params, seed=seed)  # an architecture's constructor takes (d_in, params, *, seed)

    # --- SAELens interop (see saex.sae.saelens) ---------------------------------------------------------------

    @classmethod
    def from_saelens(cls, cfg: Mapping[str, Any], extra: dict[str, torch.Tensor]) -> SAELensImport | None:
        """This architecture's reading of a SAELens file whose ``architecture`` is in ``saelens_architectures``,
        or None when the file is another one's (e.g. a SAELens ``jumprelu`` trained as BatchTopK). ``cfg`` is the
        file's cfg.json (pre-6 names updated); ``extra`` its tensors beyond the four weights, float64, with
        SAELens's conventions already folded into the weights. Pop from ``extra`` what you read: a tensor left
        there is refused as unexpected. Raise ``SAEFormatError`` for a file of yours that cannot be read."""
        raise NotImplementedError(f"{cls.__name__} lists saelens_architectures but does not implement from_saelens")

    @staticmethod
    def saelens_params(cfg: Mapping[str, Any], **fields: object) -> dict[str, Any]:
        """``SAEParams`` fields for an SAE read from SAELens, plus ``fields``: its width, no input normalisation
        (SAELens's inference SAEs have none, or folded into the weights) and ``b_dec_init`` zero."""
        return {"d_sae": int(cfg["d_sae"]), "normalize_input": False, "b_dec_init": "zero", **fields}

    def to_saelens(self) -> SAELensExport:
        """How this SAE is written for SAELens (``saex.sae.saelens.save_saelens``); the default refuses."""
        raise SAEFormatError(f"SAE architecture {self.name!r} has no SAELens equivalent")

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

    def training_preactivations(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - b_dec) W_enc + b_enc`` on scaled ``x``, for ``training_loss``: the same values, but b_dec
        enters the input detached and gets its gradient through a zero-valued bias term
        ``(b_dec.detach() - b_dec) W_enc``, so the backward computes no [n, d_in] gradient of the input (a
        sixth full-size matmul for a dense SAE, ~20% of its step). Centring before the (possibly bf16) matmul
        keeps the rounding of the uncentred input out of the pre-activations."""
        b_dec = self.b_dec.detach()
        return torch.addmm(self.b_enc + (b_dec - self.b_dec) @ self.W_enc, x - b_dec, self.W_enc)

    # --- public API (model units; dtype convention in the module doc) -------------------------------------

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as the encoder sees it, before ``b_dec``: cast to the SAE's dtype, per-token layer norm when
        ``layer_norm`` is set, times ``norm_scale``."""
        return self._normalised(x)[0]

    def _normalised(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """(``normalise(x)``, each token's (mean, std) when ``layer_norm`` is set, for undoing it)."""
        x = x.to(self.W_enc.dtype)
        if not self.layer_norm:
            return x * self.norm_scale, None
        normed, mean, std = layer_norm(x)
        return normed * self.norm_scale, (mean, std)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_scaled(self.normalise(x))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        if self.layer_norm:
            raise ValueError(
                f"{self.name} SAE with a per-token layer norm: decoding needs each token's input mean and std; "
                "use forward(x)"
            )
        return self.decode_scaled(f.to(self.W_dec.dtype)) / self.norm_scale

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scaled, stats = self._normalised(x)
        x_hat, f = self.forward_scaled(scaled)
        x_hat = x_hat / self.norm_scale
        if stats is not None:
            mean, std = stats
            x_hat = x_hat * std + mean  # OpenAI's decode: no eps on the way back
        return x_hat.to(x.dtype), f

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


def layer_norm(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """OpenAI's ``LN`` (sparse_autoencoder/model.py), which SAELens's ``layer_norm`` copies: (normalised x, mean,
    std) per token, std unbiased, eps added to the std."""
    mean = x.mean(dim=-1, keepdim=True)
    centred = x - mean
    std = centred.std(dim=-1, keepdim=True)
    return centred / (std + LAYER_NORM_EPS), mean, std


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


# --- sparse latent paths (TopK-style training) ------------------------------------------------------------


class SparsePattern:
    """Which latents are active per token: ``cols`` [nnz] latent indices grouped by token (token i owns
    ``cols[offsets[i]:offsets[i + 1]]``, ascending within a token), over a [n_tokens, d_sae] grid. The
    latent-major order the backward needs is built lazily, once."""

    def __init__(self, offsets: torch.Tensor, cols: torch.Tensor, n_tokens: int, d_sae: int):
        self.offsets, self.cols, self.n_tokens, self.d_sae = offsets, cols, n_tokens, d_sae
        self._by_latent: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def per_token(cls, indices: torch.Tensor, d_sae: int) -> tuple["SparsePattern", torch.Tensor]:
        """From [n, k] indices (TopK): the pattern and the permutation that sorts each row (apply it to the
        values with ``gather``)."""
        n, k = indices.shape
        sorted_indices, order = indices.sort(-1)
        offsets = torch.arange(0, n * k + 1, k, device=indices.device)
        return cls(offsets, sorted_indices.flatten(), n, d_sae), order

    @classmethod
    def from_flat(cls, flat: torch.Tensor, n_tokens: int, d_sae: int) -> tuple["SparsePattern", torch.Tensor]:
        """From indices into the flattened [n, d_sae] grid (BatchTopK): the pattern and ``flat`` sorted into
        its (token-major) order."""
        flat_sorted = flat.sort().values
        rows = torch.div(flat_sorted, d_sae, rounding_mode="floor")
        offsets = torch.zeros(n_tokens + 1, dtype=torch.long, device=flat.device)
        offsets[1:] = torch.bincount(rows, minlength=n_tokens).cumsum(0)
        return cls(offsets, flat_sorted - rows * d_sae, n_tokens, d_sae), flat_sorted

    def rows(self) -> torch.Tensor:
        counts = self.offsets.diff()
        return torch.repeat_interleave(torch.arange(self.n_tokens, device=counts.device), counts)

    def csr(self, values: torch.Tensor) -> torch.Tensor:
        """[n_tokens, d_sae] sparse CSR tensor with ``values`` at the pattern."""
        return torch.sparse_csr_tensor(
            self.offsets, self.cols, values, (self.n_tokens, self.d_sae), check_invariants=False
        )

    def by_latent(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(order, latent offsets [d_sae + 1], token of each entry in that order): the transposed pattern."""
        if self._by_latent is None:
            order = torch.argsort(self.cols, stable=True)
            offsets = torch.zeros(self.d_sae + 1, dtype=torch.long, device=self.cols.device)
            offsets[1:] = torch.bincount(self.cols, minlength=self.d_sae).cumsum(0)
            self._by_latent = (order, offsets, self.rows()[order])
        return self._by_latent

    def transposed_mm(self, values: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """``csr(values).T @ dense`` ([d_sae, m]): per latent, the sum of ``value * dense[token]`` over its
        entries; O(nnz * m) instead of a dense [d_sae, n] @ [n, m] matmul."""
        order, offsets, rows = self.by_latent()
        transposed = torch.sparse_csr_tensor(
            offsets, rows, values[order], (self.d_sae, self.n_tokens), check_invariants=False
        )
        return transposed @ dense


class SparseLatentDecode(torch.autograd.Function):
    """``out[i] = sum_e relu(pre_e) * W_dec[col_e]`` over token i's entries of a ``SparsePattern``, where
    ``pre_e = (x_i - b_dec) . W_enc[:, col_e] + b_enc[col_e]`` are pre-activations the caller computed densely
    without gradients (``pre_values``). Returns ``(out [n, d_in], acts [nnz])``, acts not differentiable.

    The backward touches only the nnz selected latents, never a dense [n, d_sae] gradient:
    ``grad_acts_e = W_dec[col_e] . grad_out[i]`` (sampled dense-dense matmul), ``grad_pre = grad_acts *
    [pre > 0]``, ``grad_W_dec = csr(acts)^T grad_out``, ``grad_W_enc = ((x - b_dec)^T csr(grad_pre))``,
    ``grad_b_enc`` a scatter-add, ``grad_b_dec = -W_enc grad_b_enc``. Equal to autograd through
    ``scatter(relu(pre)) @ W_dec`` (tests/sae/test_sae_speed_paths.py). Runs in float32 whatever autocast says:
    the sparse parts are cheap and bf16 sparse kernels are not available everywhere."""

    @staticmethod
    def forward(
        ctx,
        pre_values: torch.Tensor,
        x: torch.Tensor,
        b_dec: torch.Tensor,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,
        W_dec: torch.Tensor,
        pattern: SparsePattern,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(x.device.type, enabled=False):
            acts = pre_values.to(W_dec.dtype).relu()
            out = torch.nn.functional.embedding_bag(
                pattern.cols, W_dec, pattern.offsets[:-1], per_sample_weights=acts, mode="sum"
            )
        ctx.save_for_backward(acts, x, b_dec, W_enc, W_dec)
        ctx.pattern = pattern
        ctx.mark_non_differentiable(acts)
        return out, acts

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor, _grad_acts: torch.Tensor | None):  # type: ignore[override]
        acts, x, b_dec, W_enc, W_dec = ctx.saved_tensors
        pattern: SparsePattern = ctx.pattern
        grad_out = grad_out.to(W_dec.dtype).contiguous()
        need_enc = any(ctx.needs_input_grad[2:5])
        grad_b_dec = grad_W_enc = grad_b_enc = grad_W_dec = None
        if ctx.needs_input_grad[5]:
            grad_W_dec = pattern.transposed_mm(acts, grad_out)
        if need_enc:
            sampled = torch.sparse.sampled_addmm(pattern.csr(torch.zeros_like(acts)), grad_out, W_dec.T, beta=0.0)
            grad_pre = sampled.values() * (acts > 0).to(acts.dtype)
            if ctx.needs_input_grad[3]:
                grad_W_enc = pattern.transposed_mm(grad_pre, (x.to(W_enc.dtype) - b_dec)).T
            grad_b_enc = torch.zeros(pattern.d_sae, dtype=grad_pre.dtype, device=grad_pre.device)
            grad_b_enc.index_add_(0, pattern.cols, grad_pre)
            if ctx.needs_input_grad[2]:
                grad_b_dec = -(W_enc @ grad_b_enc)
            if not ctx.needs_input_grad[4]:
                grad_b_enc = None
        return None, None, grad_b_dec, grad_W_enc, grad_b_enc, grad_W_dec, None


# --- on-disk format ----------------------------------------------------------------------------------------


class SAEFormatError(ValueError):
    """A saved SAE that cannot be read: names the file and what is wrong with it."""


@dataclass(frozen=True)
class SAEFile:
    """What a saved SAE says about itself, read without loading its weights (``saex.sae.formats.describe``):
    its format, width, and the hook it was trained on where the format records one, in the format's own words
    (``hook``) and as the saex hook point it unambiguously means (``saex_hook``; None when it means none)."""

    format: str
    path: Path
    d_in: int
    d_sae: int
    hook: str | None = None
    saex_hook: str | None = None


def weight_shapes(d_in: int, d_sae: int) -> dict[str, tuple[int, ...]]:
    """The shapes of the four weights every SAE has (SAELens's names)."""
    return {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}


def check_tensor_shapes(path: Path, expected: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Every tensor shape in the safetensors file ``path``, read from its header (nothing is allocated), after
    checking the ``expected`` ones: what a config says is checked against the file before anything is built."""
    if not path.is_file():
        raise SAEFormatError(f"{path}: missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise SAEFormatError(f"{path}: not a readable safetensors file: {e}") from e
    check_shapes(path, shapes, expected)
    return shapes


def check_shapes(path: Path, shapes: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]]) -> None:
    """Refuse a file whose tensors lack one of ``expected`` or have another shape, naming both."""
    missing = [name for name in expected if name not in shapes]
    if missing:
        raise SAEFormatError(f"{path}: missing tensors {missing}; has {sorted(shapes)}")
    for name, shape in expected.items():
        if tuple(shapes[name]) != tuple(shape):
            raise SAEFormatError(f"{path}: {name} has shape {tuple(shapes[name])}, the config says {tuple(shape)}")


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
        architecture=sae.name,
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
    weights = directory / WEIGHTS_FILE
    check_tensor_shapes(weights, weight_shapes(cfg.d_in, cfg.d_sae))
    arch = architectures.get(cfg.architecture)
    if arch is None:
        valid = ", ".join(sorted(architectures)) or "(none registered)"
        raise SAEFormatError(f"{directory / CFG_FILE}: unknown SAE architecture {cfg.architecture!r}; valid: {valid}")
    try:
        params = arch.Params.model_validate(cfg.params)
    except ValidationError as e:
        raise SAEFormatError(f"{directory / CFG_FILE}: invalid params for {cfg.architecture!r}: {e}") from e
    if isinstance(params, SAEParams) and params.latents(cfg.d_in) != cfg.d_sae:  # before building allocates it
        raise SAEFormatError(f"{directory / CFG_FILE}: d_sae {cfg.d_sae} but params build {params.latents(cfg.d_in)}")
    sae = arch.build(cfg.d_in, params)
    if sae.d_sae != cfg.d_sae:
        raise SAEFormatError(f"{directory / CFG_FILE}: d_sae {cfg.d_sae} but params build {sae.d_sae}")
    dtype = getattr(torch, cfg.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise SAEFormatError(f"{directory / CFG_FILE}: unknown dtype {cfg.dtype!r}")
    sae.to(dtype)
    sae.load_state_dict(load_file(str(weights)), strict=True)
    return sae


def describe_saex(directory: Path) -> SAEFile:
    """A saex-format SAE's width; saex's cfg.json names no hook."""
    cfg = _read_cfg(directory / CFG_FILE)
    check_tensor_shapes(directory / WEIGHTS_FILE, weight_shapes(cfg.d_in, cfg.d_sae))
    return SAEFile("saex", directory, cfg.d_in, cfg.d_sae)


def _read_cfg(path: Path) -> SAEConfigFile:
    try:
        return SAEConfigFile.model_validate_json(path.read_text())
    except FileNotFoundError as e:
        raise SAEFormatError(f"{path}: missing (not a saved saex SAE directory?)") from e
    except ValidationError as e:
        raise SAEFormatError(f"{path}: invalid SAE config: {e}") from e
