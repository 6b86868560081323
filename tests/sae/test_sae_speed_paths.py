"""The fast training paths equal the plain formulations they replace: the sparse TopK/BatchTopK decode and
backward (``SparseLatentDecode``), the fused JumpReLU + L0 function, the centred pre-activations without an
input gradient, and the exact fast BatchTopK selection. Gradients are compared in float64 against autograd of
the dense reference."""

from __future__ import annotations

import pytest
import torch

from saex.plugins.sae.batchtopk import BatchTopKSAE, batch_topk_indices
from saex.plugins.sae.jumprelu import JumpReLUFunction, JumpReLUSAE, JumpReLUWithL0, StepFunction
from saex.plugins.sae.relu import ReLUSAE
from saex.plugins.sae.topk import TopKSAE
from saex.sae.base import SparseLatentDecode, SparsePattern

F64 = torch.float64


def weights(d_in: int = 6, d_sae: int = 20, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(*shape, generator=g, dtype=F64).requires_grad_()
        for name, shape in {"b_dec": (d_in,), "W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in)}.items()
    }


def sparse_out(
    w: dict[str, torch.Tensor], x: torch.Tensor, pattern: SparsePattern, values: torch.Tensor
) -> torch.Tensor:
    out, _ = SparseLatentDecode.apply(values, x, w["b_dec"], w["W_enc"], w["b_enc"], w["W_dec"], pattern)
    return out


def dense_reference(w: dict[str, torch.Tensor], x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    return (pre * mask).relu() @ w["W_dec"]


def assert_same_gradients(fast: torch.Tensor, reference: torch.Tensor, w: dict[str, torch.Tensor]) -> None:
    grad_out = torch.randn(reference.shape, generator=torch.Generator().manual_seed(9), dtype=F64)
    expected = torch.autograd.grad(reference, list(w.values()), grad_out)
    got = torch.autograd.grad(fast, list(w.values()), grad_out)
    for name, e, g in zip(w, expected, got):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10, msg=name)


def test_sparse_decode_matches_dense_topk_autograd():
    w, x = weights(), torch.randn(9, 6, dtype=F64)
    with torch.no_grad():
        pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
        values, indices = pre.topk(4, dim=-1)
        pattern, order = SparsePattern.per_token(indices, 20)
    fast = sparse_out(w, x, pattern, values.gather(-1, order).flatten())
    mask = torch.zeros(9, 20, dtype=F64).scatter_(-1, indices, 1.0)
    reference = dense_reference(w, x, mask)
    torch.testing.assert_close(fast, reference)
    assert_same_gradients(fast, reference, w)


def test_sparse_decode_matches_dense_for_uneven_rows():
    """BatchTopK patterns give tokens different counts, some none at all."""
    w, x = weights(), torch.randn(7, 6, dtype=F64)
    with torch.no_grad():
        pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
        pre[2] = -10.0  # token 2 selects nothing
        flat = pre.flatten().topk(20).indices
        pattern, flat_sorted = SparsePattern.from_flat(flat, 7, 20)
    assert pattern.offsets.diff()[2] == 0
    fast = sparse_out(w, x, pattern, pre.flatten()[flat_sorted])
    mask = torch.zeros(7 * 20, dtype=F64).index_fill_(0, flat, 1.0).view(7, 20)
    reference = dense_reference(w, x, mask)
    torch.testing.assert_close(fast, reference)
    assert_same_gradients(fast, reference, w)


def test_fused_jumprelu_matches_separate_functions():
    g = torch.Generator().manual_seed(1)
    pre = torch.rand(12, 10, generator=g, dtype=F64).requires_grad_()
    theta = (torch.rand(10, generator=g, dtype=F64) * 0.5 + 0.25).requires_grad_()
    eps, lam = 0.3, 0.7
    grad_f = torch.randn(12, 10, generator=g, dtype=F64)
    f_ref = JumpReLUFunction.apply(pre, theta, eps)
    l0_ref = StepFunction.apply(pre, theta, eps).sum(-1).mean()
    expected = torch.autograd.grad([f_ref, l0_ref], [pre, theta], [grad_f, torch.tensor(lam, dtype=F64)])
    f, l0 = JumpReLUWithL0.apply(pre.clone(), theta, eps)  # it works in place on its input
    torch.testing.assert_close(f, f_ref)
    torch.testing.assert_close(l0.double(), l0_ref)
    got = torch.autograd.grad([f, l0], [pre, theta], [grad_f, torch.tensor(lam, dtype=torch.float32)])
    for e, actual in zip(expected, got):
        torch.testing.assert_close(actual, e)


def test_training_preactivations_equal_centred_ones_and_their_gradients():
    sae = ReLUSAE.build(6, ReLUSAE.Params(d_sae=20, normalize_input=False), seed=0).double()
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
    x = torch.randn(9, 6, dtype=F64)
    params = [sae.b_dec, sae.W_enc, sae.b_enc]
    fast = sae.training_preactivations(x)
    reference = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    torch.testing.assert_close(fast, reference)
    grad = torch.randn(9, 20, dtype=F64)
    for e, g in zip(torch.autograd.grad(reference, params, grad), torch.autograd.grad(fast, params, grad)):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("seed", range(4))
def test_fast_batch_topk_selects_the_exact_top_values(seed):
    g = torch.Generator().manual_seed(seed)
    pre = torch.randn(64, 512, generator=g) + torch.randn(64, 1, generator=g)  # token scales differ
    chosen = batch_topk_indices(pre, 8)
    reference = pre.relu().flatten().topk(64 * 8).values
    assert chosen.unique().numel() == 64 * 8
    torch.testing.assert_close(pre.flatten()[chosen].sort().values, reference.sort().values)


def test_fast_batch_topk_falls_back_when_few_values_are_positive():
    pre = -torch.rand(16, 64)
    pre[0, :3] = 1.0
    chosen = batch_topk_indices(pre, 4)
    assert chosen.numel() == 64 and set(range(3)) <= set(chosen.tolist())


def assert_training_gradients_match(sae: torch.nn.Module, reference_loss, x: torch.Tensor) -> None:
    step = sae.training_loss(x)
    got = torch.autograd.grad(step.loss, [sae.b_dec, sae.W_enc, sae.b_enc, sae.W_dec])
    expected = torch.autograd.grad(reference_loss(sae, x), [sae.b_dec, sae.W_enc, sae.b_enc, sae.W_dec])
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9)


def test_topk_training_loss_gradients_equal_the_dense_formulation_with_auxk():
    sae = TopKSAE.build(
        6, TopKSAE.Params(d_sae=20, k=3, aux_k=4, dead_steps_threshold=1, normalize_input=False), seed=0
    ).double()
    x = torch.randn(10, 6, dtype=F64)
    sae.steps_since_fired[:7] = 5  # latents 0..6 count as dead for AuxK

    def dense(sae, x):
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        top = pre.topk(3, dim=-1)
        f = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
        x_hat = f @ sae.W_dec + sae.b_dec
        dead = torch.arange(20) < 7
        aux = pre.masked_fill(~dead, float("-inf")).topk(4, dim=-1)
        e_hat = torch.zeros_like(pre).scatter(-1, aux.indices, aux.values.relu()) @ sae.W_dec
        auxk = min(7 / 4, 1.0) * (e_hat - (x - x_hat).detach()).pow(2).sum(-1).mean()
        return (x_hat - x).pow(2).sum(-1).mean() + sae.params.aux_coefficient * auxk

    with torch.no_grad():
        expected_loss = dense(sae, x)
    saved = sae.steps_since_fired.clone()
    step = sae.training_loss(x)
    torch.testing.assert_close(step.loss, expected_loss)
    sae.steps_since_fired.copy_(saved)
    assert_training_gradients_match(sae, dense, x)


def test_batchtopk_training_loss_gradients_equal_the_dense_formulation():
    sae = BatchTopKSAE.build(6, BatchTopKSAE.Params(d_sae=20, k=3, normalize_input=False), seed=0).double()
    x = torch.randn(10, 6, dtype=F64)

    def dense(sae, x):
        f = sae.batch_topk((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
        return ((f @ sae.W_dec + sae.b_dec) - x).pow(2).sum(-1).mean()

    assert_training_gradients_match(sae, dense, x)


def test_jumprelu_training_loss_gradients_equal_the_separate_functions():
    sae = JumpReLUSAE.build(
        6, JumpReLUSAE.Params(d_sae=20, normalize_input=False, sparsity_coefficient=0.5, bandwidth=0.5), seed=0
    ).double()
    x = torch.randn(10, 6, dtype=F64)
    params = [sae.b_dec, sae.W_enc, sae.b_enc, sae.W_dec, sae.threshold]

    def reference(sae, x):
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        f = JumpReLUFunction.apply(pre, sae.threshold, 0.5)
        l0 = StepFunction.apply(pre, sae.threshold, 0.5).sum(-1).mean()
        return ((f @ sae.W_dec + sae.b_dec) - x).pow(2).sum(-1).mean() + 0.5 * l0

    expected = torch.autograd.grad(reference(sae, x), params)
    got = torch.autograd.grad(sae.training_loss(x).loss, params)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e)


def test_relu_training_loss_gradients_equal_the_plain_formulation():
    sae = ReLUSAE.build(6, ReLUSAE.Params(d_sae=20, normalize_input=False, l1_coefficient=0.3), seed=0).double()
    with torch.no_grad():
        sae.b_dec.normal_()
    x = torch.randn(10, 6, dtype=F64)

    def plain(sae, x):
        f = ((x - sae.b_dec) @ sae.W_enc + sae.b_enc).relu()
        mse = ((f @ sae.W_dec + sae.b_dec) - x).pow(2).sum(-1).mean()
        return mse + 0.3 * (f * sae.W_dec.norm(dim=-1)).sum(-1).mean()

    assert_training_gradients_match(sae, plain, x)


def test_sparse_train_step_reports_activity_without_densifying():
    sae = TopKSAE.build(6, TopKSAE.Params(d_sae=20, k=3, normalize_input=False), seed=0)
    step = sae.training_loss(torch.randn(10, 6))
    assert step._f.layout == torch.sparse_csr
    l0, fired = step.activity()
    dense = step.f
    assert l0 == pytest.approx((dense != 0).sum(-1).double().mean().item())
    assert torch.equal(fired, (dense != 0).any(0))
