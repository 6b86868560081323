"""saex's ``reconstruction`` and ``ce_kl`` metrics equal SAELens 6.54's own evals
(``get_sparsity_and_variance_metrics``, ``get_downstream_reconstruction_metrics``) on the same SAE (exported with
``save_saelens``), the same Llama (HF here, its TransformerLens twin there) and the same tokens, special tokens (BOS,
a mid-block EOS, a PAD) included."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from saex.model.activations import TensorActivations, collect_activations
from saex.model.hookpoints import HookPoint, capture
from saex.plugin.protocols import ActivationSource, LoadedModel, MetricContext
from saex.plugins.metrics.downstream import CEKL
from saex.plugins.metrics.reconstruction import Reconstruction
from saex.plugins.models.tiny_llama import TinyLlama
from saex.plugins.sae.jumprelu import JumpReLUSAE
from saex.plugins.sae.topk import TopKSAE
from saex.sae.base import SAE
from saex.sae.saelens import save_saelens
from saex.sae.splice_context import SpliceContext
from saex.sae.training import TrainingConfig, train_sae
from saex.storage.cache import Cache

pytest.importorskip("sae_lens")
pytest.importorskip("transformer_lens")
from sae_lens import SAE as LensSAE
from sae_lens.evals import get_downstream_reconstruction_metrics, get_sparsity_and_variance_metrics
from sae_lens.training.activation_scaler import ActivationScaler
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights

pytestmark = [
    pytest.mark.filterwarnings("ignore:HookedTransformer is deprecated:DeprecationWarning"),
    pytest.mark.usefixtures("single_thread_module"),
]
CPU = torch.device("cpu")
BOS, EOS, PAD = 0, 1, 2
IGNORE_TOKENS = [BOS, EOS, PAD]
N_EVAL_BLOCKS, N_TRAIN_BLOCKS, BLOCK = 6, 40, 32
LENS_BATCH_PROMPTS = 2  # SAELens sees the eval blocks in 3 batches, saex's CE/KL in batches of 4: pooling must agree
TL_HOOKS = {"resid_post": "hook_resid_post", "mlp_out": "hook_mlp_out"}
ARCHITECTURES = {
    "topk": (TopKSAE, {"k": 8}),
    "jumprelu": (JumpReLUSAE, {"sparsity_coefficient": 0.3, "threshold_init": 1.0}),
}
# metric: (saex key, SAELens key, tolerance); scores and shares to abs 1e-4, magnitudes to rel 1e-4
RECONSTRUCTION_KEYS = {
    "mse": ("mse", {"rel": 1e-4}),
    "cos": ("cossim", {"abs": 1e-4}),
    "l2_ratio": ("l2_ratio", {"abs": 1e-4}),
    "explained_variance": ("explained_variance", {"abs": 1e-4}),
    "l0": ("l0", {"rel": 1e-4}),
    "l1": ("l1", {"rel": 1e-4}),
}
DOWNSTREAM_KEYS = {
    "ce_clean": ("ce_loss_without_sae", {"rel": 1e-4}),
    "ce_sae": ("ce_loss_with_sae", {"rel": 1e-4}),
    "ce_ablated": ("ce_loss_with_ablation", {"rel": 1e-4}),
    "ce_loss_score": ("ce_loss_score", {"abs": 1e-4}),
    "kl_sae": ("kl_div_with_sae", {"rel": 1e-4}),
    "kl_ablated": ("kl_div_with_ablation", {"rel": 1e-4}),
    "kl_div_score": ("kl_div_score", {"abs": 1e-4}),
}


@pytest.fixture(scope="module")
def llama() -> LoadedModel:
    """The tiny Llama with unit-variance weights and logits of std ~3, so that it predicts its own samples far
    better than the ablated model does and layer 1's MLP matters (the default init's outputs are near uniform)."""
    loaded = TinyLlama().load(TinyLlama.Params(num_hidden_layers=4), CPU)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in loaded.model.named_parameters():
            if p.ndim == 2:
                scale = 1.0 if "embed" in name else (3.0 if "lm_head" in name else 1.0) / math.sqrt(p.shape[1])
                # embeddings std 1, other matrices std 1/sqrt(fan_in), the unembedding 3/sqrt(fan_in)
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return loaded


def hooked_twin(model: torch.nn.Module) -> HookedTransformer:
    """A TransformerLens ``HookedTransformer`` with the weights of the HF Llama ``model``, unprocessed."""
    c = model.config
    rope = getattr(c, "rope_theta", None) or (getattr(c, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    cfg = HookedTransformerConfig(
        d_model=c.hidden_size,
        d_head=c.hidden_size // c.num_attention_heads,
        n_heads=c.num_attention_heads,
        d_mlp=c.intermediate_size,
        n_layers=c.num_hidden_layers,
        n_ctx=c.max_position_embeddings,
        d_vocab=c.vocab_size,
        eps=c.rms_norm_eps,
        act_fn=c.hidden_act,
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_dim=c.hidden_size // c.num_attention_heads,
        rotary_base=rope,
        rotary_adjacent_pairs=False,
        gated_mlp=True,
        final_rms=True,
        original_architecture="LlamaForCausalLM",
        device="cpu",
        dtype=torch.float32,
        n_key_value_heads=c.num_key_value_heads if c.num_key_value_heads != c.num_attention_heads else None,
    )
    twin = HookedTransformer(cfg)
    twin.load_and_process_state_dict(
        convert_llama_weights(model, cfg),
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
    )
    return twin.eval()


@pytest.fixture(scope="module")
def blocks(llama: LoadedModel) -> tuple[torch.Tensor, torch.Tensor]:
    """(eval, train) blocks sampled from the model after a BOS (ids >= 3); eval has an EOS mid-block and a PAD
    as some block's last token."""
    g = torch.Generator().manual_seed(1)
    ids = torch.full((N_EVAL_BLOCKS + N_TRAIN_BLOCKS, BLOCK), BOS)
    with torch.no_grad():
        for t in range(1, BLOCK):
            logits = llama.model(input_ids=ids[:, :t], use_cache=False).logits[:, -1].double()
            logits[:, : len(IGNORE_TOKENS)] = -math.inf
            ids[:, t] = torch.multinomial(logits.softmax(-1), 1, generator=g)[:, 0]
    eval_blocks, train_blocks = ids[:N_EVAL_BLOCKS].clone(), ids[N_EVAL_BLOCKS:]
    eval_blocks[2, 12], eval_blocks[4, -1] = EOS, PAD
    return eval_blocks, train_blocks


@pytest.fixture(scope="module")
def twin(llama: LoadedModel, blocks: tuple[torch.Tensor, torch.Tensor]) -> HookedTransformer:
    model = hooked_twin(llama.model)
    with torch.no_grad():
        torch.testing.assert_close(model(blocks[0]), llama.model(input_ids=blocks[0]).logits, atol=1e-4, rtol=1e-4)
    return model


@dataclass
class Case:
    hook: HookPoint
    ours: SAE
    lens: Any  # sae_lens.SAE
    eval_activations: ActivationSource


@pytest.fixture(scope="module", params=[(s, a) for s in TL_HOOKS for a in ARCHITECTURES], ids="-".join)
def case(
    request: pytest.FixtureRequest,
    llama: LoadedModel,
    blocks: tuple[torch.Tensor, torch.Tensor],
    tmp_path_factory: pytest.TempPathFactory,
) -> Case:
    """A briefly trained saex SAE at layer 1 (input normalisation on: ``save_saelens`` must fold it), the same SAE
    loaded by SAELens, and saex's eval activations collected as the runner does (special tokens dropped)."""
    site, arch_name = request.param
    hook, tl_hook = HookPoint(1, site), f"blocks.1.{TL_HOOKS[site]}"
    eval_blocks, train_blocks = blocks
    train_x = capture(llama.model, train_blocks, [hook])[hook][:, 1:].reshape(-1, llama.model.config.hidden_size)
    arch, params = ARCHITECTURES[arch_name]
    ours = arch.build(train_x.shape[1], arch.Params(d_sae=256, **params), seed=0)
    train_sae(
        ours,
        TensorActivations(train_x),
        TrainingConfig(tokens=12_000, batch_size=128, lr=3e-3),
        device=CPU,
        progress=False,
    )
    ours.eval()
    directory = tmp_path_factory.mktemp(f"{site}-{arch_name}")
    save_saelens(ours, directory / "sae", metadata={"hook_name": tl_hook})
    lens = LensSAE.load_from_disk(directory / "sae", device="cpu")
    activations = collect_activations(
        Cache(directory / "cache"),
        llama.model,
        llama.tokenizer,
        eval_blocks,
        [hook],
        {"test": "saelens-parity"},
        device=CPU,
        batch_blocks=4,
        progress=False,
    )[hook]
    assert float(ours.norm_scale) != 1.0 and lens.cfg.metadata.hook_name == tl_hook
    return Case(hook, ours, lens, activations)


class TokenBatches:
    """The part of SAELens's ``ActivationsStore`` its evals use: successive batches of the eval blocks."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks, self.taken = blocks, 0

    def get_batch_tokens(self, n: int) -> torch.Tensor:
        batch = self.blocks[self.taken : self.taken + n]
        self.taken += n
        return batch


def assert_same(ours: dict[str, float], lens: dict[str, float], keys: dict[str, tuple[str, dict[str, float]]]) -> None:
    found = {key: (ours[key], lens[lens_key]) for key, (lens_key, _) in keys.items()}
    wrong = {key: pair for key, pair in found.items() if pair[0] != pytest.approx(pair[1], **keys[key][1])}
    assert not wrong, f"saex vs SAELens differ (ours, theirs): {wrong}"


def test_transformer_lens_twin_has_the_hf_activations(
    llama: LoadedModel, twin: HookedTransformer, blocks: tuple[torch.Tensor, torch.Tensor]
) -> None:
    eval_blocks = blocks[0]
    hooks = {HookPoint(1, site): f"blocks.1.{name}" for site, name in TL_HOOKS.items()}
    ours = capture(llama.model, eval_blocks, list(hooks))
    with torch.no_grad():
        _, cache = twin.run_with_cache(eval_blocks, names_filter=list(hooks.values()))
    for hook, name in hooks.items():
        torch.testing.assert_close(ours[hook], cache[name], atol=1e-4, rtol=1e-4)


def test_reconstruction_metrics_equal_saelens_evals(
    case: Case, twin: HookedTransformer, blocks: tuple[torch.Tensor, torch.Tensor]
) -> None:
    ours = Reconstruction().compute(
        MetricContext(case.ours, case.eval_activations, CPU, batch_size=64), Reconstruction.Params()
    )
    store = TokenBatches(blocks[0])
    with torch.no_grad():
        lens, features = get_sparsity_and_variance_metrics(
            case.lens,
            twin,
            store,
            ActivationScaler(),
            n_batches=N_EVAL_BLOCKS // LENS_BATCH_PROMPTS,
            compute_l2_norms=True,
            compute_sparsity_metrics=True,
            compute_variance_metrics=True,
            compute_featurewise_density_statistics=True,
            eval_batch_size_prompts=LENS_BATCH_PROMPTS,
            model_kwargs={},
            ignore_tokens=IGNORE_TOKENS,
        )
    assert store.taken == N_EVAL_BLOCKS
    assert 0.3 < ours["explained_variance"] < 0.99 and 1 < ours["l0"] < 32  # a real, imperfect SAE
    assert_same(ours, lens, RECONSTRUCTION_KEYS)
    density = torch.tensor(features["feature_density"], dtype=torch.float64)
    assert ours["dead_frac"] == pytest.approx((density == 0).double().mean().item(), abs=1e-12)
    assert ours["dense_frac"] == pytest.approx((density > 0.1).double().mean().item(), abs=1e-12)


def test_ce_kl_metrics_equal_saelens_evals(
    case: Case, llama: LoadedModel, twin: HookedTransformer, blocks: tuple[torch.Tensor, torch.Tensor]
) -> None:
    ctx = SpliceContext(llama.model, case.hook, blocks[0], llama.tokenizer, CPU, {"sae": case.ours})
    ours = CEKL().compute_spliced(ctx, CEKL.Params(max_tokens=10_000, batch_blocks=4))["sae"]
    store = TokenBatches(blocks[0])
    lens = get_downstream_reconstruction_metrics(
        case.lens,
        twin,
        store,
        ActivationScaler(),
        compute_kl=True,
        compute_ce_loss=True,
        n_batches=N_EVAL_BLOCKS // LENS_BATCH_PROMPTS,
        eval_batch_size_prompts=LENS_BATCH_PROMPTS,
        ignore_tokens=IGNORE_TOKENS,
    )
    assert store.taken == N_EVAL_BLOCKS
    assert 0.2 < ours["ce_loss_score"] < 0.95 and 0.2 < ours["kl_div_score"] < 0.95  # far from a trivial SAE
    assert_same(ours, lens, DOWNSTREAM_KEYS)
