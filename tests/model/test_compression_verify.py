"""saex.model.verify's quantization and N:M checks, and dense weights of modules that replaced nn.Linear."""

import pytest
import torch
from torch import nn

from saex.model.verify import (
    CompressionMismatch,
    LayerReport,
    dense_weight,
    max_distinct_per_group,
    n_m_holds,
    quant_groups,
    verify,
)
from saex.plugin.protocols import CompressionExpectation


class Wrapped(nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.inner = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        self.inner.weight.data.copy_(weight)

    def dequantize(self):
        return self.inner.weight


def _model(weight: torch.Tensor) -> nn.Module:
    model = nn.Module()
    model.proj = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        model.proj.weight.copy_(weight)
    return model


def test_n_m_holds_checks_every_group_along_the_input_dim():
    w = torch.tensor([[1.0, 2.0, 0.0, 0.0, 0.0, 3.0, 0.0, 4.0]])
    assert n_m_holds(w, 2, 4) and not n_m_holds(w, 1, 4)
    assert not n_m_holds(w.t(), 2, 4)  # 4 does not divide an input width of 1
    w[0, 2] = 5.0
    assert not n_m_holds(w, 2, 4)


def test_distinct_values_per_group_follow_the_layout():
    w = torch.arange(16.0).reshape(2, 8) % 4  # each row: 0 1 2 3 0 1 2 3
    assert max_distinct_per_group(w, 4) == 4 and max_distinct_per_group(w, 2) == 2
    assert max_distinct_per_group(w, None) == 4
    assert quant_groups(w, 4, axis=0).shape == (4, 4)  # hqq axis 0: columns of reshape(4, -1)
    assert max_distinct_per_group(w, 5) == 16  # no valid grouping: worst case, so the check fails


def test_verify_flags_a_layer_that_was_not_quantized():
    torch.manual_seed(0)
    model = _model(torch.randn(4, 64))
    expectation = CompressionExpectation(targets=["proj"], bits=4, group_size=32)
    with pytest.raises(CompressionMismatch) as err:
        verify(model, ["proj"], expectation)
    assert err.value.problems == [
        "proj: a quantization group of 32 holds 32 distinct values, more than 2^4 = 16 (not quantized to 4 bits)"
    ]
    assert err.value.report[0].max_distinct_per_group == 32


def test_verify_flags_a_broken_n_m_pattern():
    model = _model(torch.ones(2, 8))
    with torch.no_grad():
        model.proj.weight[:, 1::2] = 0
    expectation = CompressionExpectation(sparsity=0.5, targets=["proj"], n_m=(2, 4))
    assert verify(model, ["proj"], expectation)[0].n_m_ok is True
    with torch.no_grad():
        model.proj.weight[0, :4] = 1.0
        model.proj.weight[0, 4:] = 0.0
    with pytest.raises(CompressionMismatch, match="proj: 2:4 pattern broken"):
        verify(model, ["proj"], expectation)


def test_dense_weight_reads_dequantize_and_names_a_module_without_weights():
    w = torch.randn(3, 8)
    assert torch.equal(dense_weight(Wrapped(w)), w)
    with pytest.raises(TypeError, match="odd is a ReLU without a dense `weight`"):
        dense_weight(nn.ReLU(), "odd")


def test_layer_report_fields_default_for_old_callers():
    report = LayerReport(name="a", shape=(2, 2), n_params=4, sparsity=0.0)
    assert report.n_m_ok is None and report.max_distinct_per_group is None and report.module_type is None
