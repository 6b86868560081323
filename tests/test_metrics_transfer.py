"""Transfer metrics on constructed cases: an SAE compared with itself is perfect; known shifts are measured."""

import pytest
import torch

from saex.activations import TensorActivations
from saex.plugins.metrics.transfer import Transfer, decoder_match
from saex.plugins.sae.topk import TopKSAE
from saex.protocols import MetricContext


@pytest.fixture
def sae():
    return TopKSAE.build(8, TopKSAE.Params(d_sae=32, k=4, normalize_input=False), seed=0).eval()


def compute(sae, x, x_ref=None, ref_sae=None):
    ctx = MetricContext(
        sae,
        TensorActivations(x),
        torch.device("cpu"),
        batch_size=7,
        reference_activations=TensorActivations(x_ref) if x_ref is not None else None,
        reference_sae=ref_sae,
    )
    return Transfer().compute(ctx, Transfer.Params())


def test_sae_compared_with_itself_is_perfect(sae):
    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(1))
    found = compute(sae, x, x, sae)
    assert found["freq_shift_mean_abs"] == 0
    assert found["freq_corr"] == pytest.approx(1)
    assert found["act_corr_mean"] == pytest.approx(1, abs=1e-9)
    assert found["dec_match_mean_max_cos"] == pytest.approx(1, abs=1e-6)
    assert found["dec_match_share_above_0.7"] == 1


def test_no_reference_gives_no_transfer_metrics(sae):
    assert compute(sae, torch.randn(10, 8)) == {}


def test_frequency_shift_is_measured(sae):
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(2))
    # the same tokens on "M_c" are shifted so some latents fire on different tokens
    found = compute(sae, x + 3 * torch.randn(300, 8, generator=torch.Generator().manual_seed(3)), x)
    with torch.no_grad():
        da = (sae.encode(x) != 0).double().mean(0)
        db = (sae.encode(x + 3 * torch.randn(300, 8, generator=torch.Generator().manual_seed(3))) != 0).double().mean(0)
    assert found["freq_shift_mean_abs"] == pytest.approx(float((da - db).abs().mean()), abs=1e-12)
    assert found["act_corr_mean"] < 0.9


def test_decoder_match_guards_zero_rows():
    w = torch.eye(4)
    pruned = w.clone()
    pruned[1] = 0
    best = decoder_match(pruned, w)
    assert torch.equal(best, torch.tensor([1.0, 0.0, 1.0, 1.0]))
    rotated = torch.tensor([[1.0, 1.0, 0, 0]])
    assert decoder_match(rotated, w).item() == pytest.approx(2**-0.5)
