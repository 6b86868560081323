"""SAE training speed per registered architecture at d_in=576, d_sae=8192, batch 4096 (SmolLM2-135M's width),
beside two baselines measured in the same run (the machine may be shared, so only same-run ratios mean much):

- SAELens's own training step (``training_forward_pass`` + backward + Adam) for the same architecture, sizes
  and data, with SAELens's default options (skipped when sae_lens is not installed or has no equivalent);
- the machine's fp32 matmul rate on a 4096x576 @ 576x8192 product, turned into a FLOP bound in tokens/s:
  dense architectures (relu, jumprelu, and any unknown one) need 5 such matmuls per step, forward and
  backward, i.e. 10 * d_in * d_sae FLOP per token; sparse ones (topk, batchtopk) need only the dense encoder
  forward, 2 * d_in * d_sae FLOP per token (their sparse decode and gradients are left out of the bound, so
  it is optimistic).

One "step" is what the trainer does per batch: ``training_loss``, backward, ``before_step``, Adam,
``after_step`` and the activity statistics. Also a bf16 mode (``TrainingConfig.precision = "bfloat16"``:
autocast) against SAELens in fp32. docs/PERFORMANCE.md records the figures.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from benchmarks.conftest import best_of
from saex.plugin.manager import load_plugins
from saex.sae.base import SAE

D_IN, D_SAE, BATCH, K = 576, 8192, 4096, 32
SPARSE = {"topk", "batchtopk"}  # architectures whose training needs only the encoder forward to be dense
ARCHITECTURES = {name: r.component for name, r in load_plugins().components["sae"].items()}


def activations(seed: int = 0) -> torch.Tensor:
    """Residual-stream-like batch: a shared offset plus heavy-tailed per-dimension scales, mean norm ~140
    (SmolLM2's layer-9 output); the SAE's input normalisation brings it to sqrt(d_in) as in training."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.rand(D_IN, generator=g).pow(3) * 10 + 1
    offset = torch.randn(D_IN, generator=g) * 2
    return torch.randn(BATCH, D_IN, generator=g) * scales + offset


def build(name: str) -> SAE:
    arch = ARCHITECTURES[name]
    fields = arch.Params.model_fields
    params = {"d_sae": D_SAE} | ({"k": K} if "k" in fields else {})
    sae = arch.build(D_IN, arch.Params(**params), seed=0)
    return sae


def our_step(sae: SAE, x: torch.Tensor, precision: str) -> Callable[[], None]:
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-5)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16")
    sae.train()

    def step() -> None:
        with autocast:
            out = sae.training_loss(x)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        sae.before_step()
        optimizer.step()
        sae.after_step()
        out.activity()
        out.loss.item()

    return step


def saelens_step(name: str, x_scaled: torch.Tensor) -> Callable[[], None] | None:
    """SAELens's training step for ``name`` with its default options, or None without an equivalent."""
    try:
        from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
        from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
        from sae_lens.saes.sae import TrainStepInput
        from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
        from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    except ImportError:
        return None
    torch.manual_seed(0)
    sizes = {"d_in": D_IN, "d_sae": D_SAE}
    builders = {
        "relu": lambda: (StandardTrainingSAE(StandardTrainingSAEConfig(**sizes)), {"l1": 5.0}),
        "topk": lambda: (TopKTrainingSAE(TopKTrainingSAEConfig(**sizes, k=K)), {}),
        "batchtopk": lambda: (BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**sizes, k=K)), {}),
        "jumprelu": lambda: (JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(**sizes)), {"l0": 1e-3}),
    }
    if name not in builders:
        return None
    lens, coefficients = builders[name]()
    lens.train()
    optimizer = torch.optim.Adam(lens.parameters(), lr=1e-5)
    dead = torch.zeros(D_SAE, dtype=torch.bool)

    def step() -> None:
        out = lens.training_forward_pass(
            TrainStepInput(
                sae_in=x_scaled,
                coefficients=coefficients,
                dead_neuron_mask=dead,
                n_training_steps=0,
                is_logging_step=False,
            )
        )
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


def matmul_flops_per_s() -> float:
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(BATCH, D_IN, generator=g), torch.randn(D_IN, D_SAE, generator=g)
    a @ b
    return 2 * BATCH * D_IN * D_SAE / best_of(lambda: a @ b)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_sae_training_speed(benchmark, name):
    x = activations()
    sae = build(name)
    with torch.no_grad():
        sae.norm_scale.fill_(D_IN**0.5 / x.norm(dim=-1).mean().item())
        sae.b_dec.copy_(x.mean(0) * sae.norm_scale)
    x_scaled = x * sae.norm_scale

    rate = matmul_flops_per_s()
    benchmark.pedantic(our_step(sae, x, "float32"), rounds=3, iterations=1, warmup_rounds=1)
    ours = BATCH / benchmark.stats.stats.min
    flop_per_token = (2 if name in SPARSE else 10) * D_IN * D_SAE
    bound = rate / flop_per_token
    info: dict[str, float | str | None] = {
        "tok_per_s": ours,
        "matmul_gflop_per_s": rate / 1e9,
        "flop_bound_formula": f"{2 if name in SPARSE else 10} * d_in * d_sae FLOP/token",
        "flop_bound_tok_per_s": bound,
        "fraction_of_flop_bound": ours / bound,
    }

    bf16 = our_step(build(name), x, "bfloat16")
    bf16()  # warm-up
    info["bf16_tok_per_s"] = BATCH / best_of(bf16, repeats=2)

    lens = saelens_step(name, x_scaled)
    if lens is not None:
        lens()  # warm-up
        lens_tok_s = BATCH / best_of(lens, repeats=2)
        info |= {
            "saelens_tok_per_s": lens_tok_s,
            "ratio_to_saelens": ours / lens_tok_s,
            "bf16_ratio_to_saelens_fp32": info["bf16_tok_per_s"] / lens_tok_s,
        }  # type: ignore[operator]
    benchmark.extra_info.update(info)
    vs = (
        (
            f", {info['ratio_to_saelens']:.2f}x SAELens ({info['saelens_tok_per_s']:,.0f}), "
            f"bf16 {info['bf16_ratio_to_saelens_fp32']:.2f}x"
        )
        if lens is not None
        else ""
    )
    print(
        f"\n{name}: {ours:,.0f} tok/s fp32 ({ours / bound:.0%} of the {flop_per_token // (D_IN * D_SAE)}"
        f"*d_in*d_sae bound at {rate / 1e9:.0f} GFLOP/s){vs}; bf16 {info['bf16_tok_per_s']:,.0f} tok/s"
    )
