"""Benchmarks report speed as ratios against a baseline measured in the same run (never timed asserts)."""

import time
from collections.abc import Callable

import pytest
import torch


def best_of(fn: Callable[[], object], repeats: int = 3) -> float:
    """Best wall time of ``repeats`` calls: the in-run baseline a benchmark is divided by."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


@pytest.fixture(scope="session")
def smollm2():
    from saex.plugins.models.embedded import SMOLLM2

    return SMOLLM2.load(SMOLLM2.Params(), torch.device("cpu"))
