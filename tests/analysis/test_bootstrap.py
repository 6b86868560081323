"""Block bootstrap (saex.analysis.bootstrap): intervals cover the true mean at about the nominal rate when tokens
within a block are correlated (and a token bootstrap does not), resamples are exactly reproducible for a seed, and a
statistic's paired difference with itself is exactly 0 with a zero-width interval."""

from __future__ import annotations

import math

import pytest
import torch

from saex.analysis.bootstrap import CI_HIGH, CI_LOW, VS_ORIGINAL, BlockSums, Bootstrap, BootstrapParams, point
from saex.data.corpus import row_blocks

BLOCKS, TOKENS_PER_BLOCK = 40, 16


def correlated_tokens(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token values of mean 0: a shared effect per block (sd 1) plus token noise (sd 1), and their blocks."""
    effect = torch.randn(BLOCKS, 1, generator=generator, dtype=torch.float64)
    values = effect + torch.randn(BLOCKS, TOKENS_PER_BLOCK, generator=generator, dtype=torch.float64)
    return values.flatten(), torch.arange(BLOCKS).repeat_interleave(TOKENS_PER_BLOCK)


def mean_statistic(sums: BlockSums):
    return lambda w: sums.total("value", w) / sums.total("n", w)


def covers_zero(values: torch.Tensor, blocks: torch.Tensor, n_blocks: int, seed: int) -> bool:
    sums = BlockSums(n_blocks)
    sums.add("value", values, blocks)
    sums.add("n", torch.ones_like(values), blocks)
    found = Bootstrap(n_blocks, BootstrapParams(resamples=400, seed=seed)).intervals({"m": mean_statistic(sums)})
    return found["m" + CI_LOW] <= 0 <= found["m" + CI_HIGH]


def test_block_intervals_cover_the_true_mean_at_the_nominal_rate_and_token_intervals_do_not():
    generator = torch.Generator().manual_seed(0)
    repetitions = 200
    by_block = by_token = 0
    for seed in range(repetitions):
        values, blocks = correlated_tokens(generator)
        by_block += covers_zero(values, blocks, BLOCKS, seed)
        by_token += covers_zero(values, torch.arange(len(values)), len(values), seed)
    # 0.95 within 3 binomial standard deviations (sqrt(0.95 * 0.05 / 200) = 0.0154): [0.904, 0.996]
    # measured with seed 0: 0.945 by block, 0.445 by token
    assert abs(by_block / repetitions - 0.95) <= 3 * math.sqrt(0.95 * 0.05 / repetitions), by_block
    # resampling tokens ignores the block effect: its interval is ~1/3 as wide, covering about half the time
    assert by_token / repetitions < 0.7, by_token


def test_the_same_seed_gives_the_same_resamples_and_another_seed_others():
    params = BootstrapParams(resamples=50, seed=3)
    first, again = Bootstrap(12, params).weights, Bootstrap(12, params).weights
    assert torch.equal(first, again)
    assert not torch.equal(first, Bootstrap(12, BootstrapParams(resamples=50, seed=4)).weights)
    assert first.shape == (50, 12) and torch.all(first.sum(dim=1) == 12)  # K draws with replacement


def test_percentile_interval_of_hand_made_samples():
    # quantiles 0.025 and 0.975 of 0..100 (linear interpolation): 2.5 and 97.5
    bootstrap = Bootstrap(3, BootstrapParams(resamples=10))
    assert bootstrap.interval(torch.arange(101, dtype=torch.float64)) == pytest.approx((2.5, 97.5), abs=1e-12)


def test_one_block_gives_a_zero_width_interval_at_the_point():
    sums = BlockSums(1)
    sums.add("value", torch.tensor([1.0, 2.0, 6.0]), torch.zeros(3, dtype=torch.long))
    sums.add("n", torch.ones(3), torch.zeros(3, dtype=torch.long))
    found = Bootstrap(1, BootstrapParams()).intervals({"m": mean_statistic(sums)})
    assert point(mean_statistic(sums), 1) == 3.0
    assert found == {"m" + CI_LOW: 3.0, "m" + CI_HIGH: 3.0}


def test_a_statistic_against_itself_differs_by_exactly_zero():
    values, blocks = correlated_tokens(torch.Generator().manual_seed(1))
    sums = BlockSums(BLOCKS)
    sums.add("value", values, blocks)
    sums.add("n", torch.ones_like(values), blocks)
    mine = {"m": mean_statistic(sums)}
    found = Bootstrap(BLOCKS, BootstrapParams()).differences(mine, mine, {"m": 0.25}, {"m": 0.25})
    assert found == {"m" + VS_ORIGINAL: 0.0, "m" + VS_ORIGINAL + CI_LOW: 0.0, "m" + VS_ORIGINAL + CI_HIGH: 0.0}


def test_sums_do_not_depend_on_how_rows_are_split_into_batches():
    values, blocks = correlated_tokens(torch.Generator().manual_seed(2))
    whole, split = BlockSums(BLOCKS), BlockSums(BLOCKS)
    whole.add("value", values, blocks)
    for start in range(0, len(values), 37):  # batches straddle blocks
        split.add("value", values[start : start + 37], blocks[start : start + 37])
    torch.testing.assert_close(split.sums["value"], whole.sums["value"], rtol=1e-14, atol=1e-14)


class SpecialIds:
    all_special_ids = (0, 1, 2)  # BOS, EOS, PAD


def test_row_blocks_follow_the_activation_order_without_special_tokens():
    # block 0 keeps 3 of 4 tokens, block 1 keeps 2 (a mid-block EOS), block 2 keeps 3
    ids = torch.tensor([[0, 5, 6, 7], [0, 5, 1, 6], [0, 9, 9, 9]])
    assert row_blocks(ids, SpecialIds()).tolist() == [0, 0, 0, 1, 1, 2, 2, 2]


def test_params_refuse_a_level_outside_zero_one():
    with pytest.raises(ValueError):
        BootstrapParams(confidence=1.0)
    with pytest.raises(ValueError):
        BootstrapParams(resamples=0)
