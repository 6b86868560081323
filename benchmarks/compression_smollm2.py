"""Time every compression of registry.yaml on SmolLM2-135M and measure its eval perplexity on KJV.

    .venv/bin/python benchmarks/compression_smollm2.py [NAME ...]   # default: every registry compression

Calibration: 32 blocks x 128 tokens of the KJV calibration split; eval: 32 x 128 of
the eval split. Perplexity as in docs/METRICS.md (predictions from special tokens dropped). Prints one
markdown row per compression for docs/COMPRESSION.md.
"""

from __future__ import annotations

import copy
import sys
import time

import torch

from saex.cli import PROJECT_REGISTRY
from saex.config.registry import load_registry
from saex.data.corpus import pack
from saex.model.language_model import next_token_loss
from saex.model.verify import clone_weights, linear_layers, verify
from saex.plugin.manager import load_plugins
from saex.plugin.protocols import CompressionContext, NoParams
from saex.plugins.corpora.kjv import KJV
from saex.plugins.models.embedded import SMOLLM2


def main(names: list[str]) -> None:
    plugins = load_plugins(entry_points=False)
    registry = load_registry([PROJECT_REGISTRY], plugins)
    loaded = SMOLLM2.load(NoParams(), torch.device("cpu"))
    blocks = pack(KJV().documents(NoParams()), loaded.tokenizer, 128, {"train": 0, "calibration": 32, "eval": 32})
    ctx = CompressionContext(blocks["calibration"], loaded.tokenizer, torch.device("cpu"), seed=0)
    print("| compression | seconds | eval ppl | mean sparsity | max rel. error | max distinct / group |")
    print("|---|---|---|---|---|---|")
    for name in names or list(registry.compressions):
        resolved = registry.component("compressions", name)
        compressor, params = resolved.component, resolved.params
        model = copy.deepcopy(loaded.model)
        expectation = compressor.expectation(model, params)
        targets = expectation.targets or list(linear_layers(model))
        originals = clone_weights(model, targets)
        start = time.perf_counter()
        model = compressor.compress(model, params, ctx)
        seconds = time.perf_counter() - start
        report = verify(model, targets, expectation, originals)
        ppl = next_token_loss(model, blocks["eval"], loaded.tokenizer, device=torch.device("cpu"))["ppl"]
        sparsity = sum(r.sparsity * r.n_params for r in report) / sum(r.n_params for r in report)
        distinct = max((r.max_distinct_per_group or 0 for r in report), default=0) or "-"
        rel = max(r.rel_error or 0.0 for r in report)
        print(f"| {name} | {seconds:.1f} | {ppl:.2f} | {sparsity:.3f} | {rel:.3f} | {distinct} |", flush=True)
        del model, originals


if __name__ == "__main__":
    main(sys.argv[1:])
