"""The harness's model passes against the bare forward passes they are built on, on SmolLM2-135M (fp32, CPU),
with real KJV token blocks (128 tokens each). Only same-run ratios are reported (the machine may be shared):

- activation collection (``saex.model.activations.collect_activations``: early-stopped pass, special-token
  filtering, finiteness check, safetensors shards in a fresh cache) against a bare early-exit forward
  (``saex.model.hookpoints.capture(..., stop_early=True)``) over the same 32 blocks in the same batches of 8; once
  for one hook (layers.9.resid_post) and once for two hooks of that layer collected in one pass
  (layers.9.mlp_out and layers.9.resid_post) against one bare forward to layers.9.resid_post.
  Target: collection >= 95% of the bare forward's tokens/s.
- CE/KL (the ``ce_kl`` splice metric, ``CEKL.compute_spliced``) at layers.9.resid_post on 16 blocks, batches
  of 4, with 2 untrained TopK SAEs and a mean activation: 1 clean + 2 baselines (zero and mean ablation)
  + 2 SAEs = 5 suffix passes per batch, against a bare suffix forward
  (``saex.model.splice.suffix_logits(model, hidden, hook, None, None)``) over the same blocks and batches.
  The prefix passes (layers before the hook, once per batch) are run beforehand into the context's prefix memo,
  as the runner shares them between the splice metrics of a model, and timed separately. Bootstrap resamples
  are set to 10 to keep the intervals' cost out. Target: CE/KL's tokens/s per suffix pass >= 90% of the bare
  suffix forward's tokens/s (``ratio_per_pass``; ``ratio_per_pass_with_prefix`` adds the prefix seconds).

docs/PERFORMANCE.md records the figures.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from benchmarks.conftest import best_of
from saex.data.corpus import pack, special_mask
from saex.model.activations import collect_activations
from saex.model.hookpoints import capture, parse_hook
from saex.model.splice import Prefixes, prefix, suffix_logits
from saex.plugin.manager import load_plugins
from saex.plugin.protocols import NoParams
from saex.plugins.corpora.kjv import KJV
from saex.plugins.metrics.downstream import CEKL
from saex.sae.splice_context import SpliceContext
from saex.storage.cache import Cache

BLOCK_SIZE = 128
COLLECT_BLOCKS, COLLECT_BATCH = 32, 8
SPLICE_BLOCKS, SPLICE_BATCH = 16, 4
SPLICE_HOOK = "layers.9.resid_post"
N_SAES, D_SAE, K = 2, 8192, 32
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def kjv_blocks(smollm2) -> torch.Tensor:
    n = max(COLLECT_BLOCKS, SPLICE_BLOCKS)
    split = {"train": n, "calibration": 0, "eval": 0}
    return pack(KJV().documents(NoParams()), smollm2.tokenizer, BLOCK_SIZE, split, progress=False)["train"]


@pytest.mark.parametrize(
    "hooks", [["layers.9.resid_post"], ["layers.9.mlp_out", "layers.9.resid_post"]], ids=["one_hook", "two_hooks"]
)
def test_collection_vs_early_exit_forward(benchmark, smollm2, kjv_blocks, tmp_path, hooks):
    blocks = kjv_blocks[:COLLECT_BLOCKS]
    points = [parse_hook(h) for h in hooks]
    last = parse_hook("layers.9.resid_post")  # the bare forward stops where the collection pass does
    tokens = blocks.numel()

    def bare() -> None:
        for start in range(0, len(blocks), COLLECT_BATCH):
            capture(smollm2.model, blocks[start : start + COLLECT_BATCH], [last], stop_early=True)

    calls = itertools.count()

    def collect() -> None:
        n = next(calls)  # a fresh cache and key every call: nothing is ever read back from a previous one
        collect_activations(
            Cache(tmp_path / f"cache{n}"),
            smollm2.model,
            smollm2.tokenizer,
            blocks,
            points,
            {"bench": "passes", "call": n},
            device=CPU,
            batch_blocks=COLLECT_BATCH,
            progress=False,
        )

    bare()  # warm-up
    baseline = best_of(bare, repeats=2)
    benchmark.pedantic(collect, rounds=2, iterations=1)
    ours = benchmark.stats.stats.min
    ratio = baseline / ours
    benchmark.extra_info.update(
        {
            "hooks": hooks,
            "tokens": tokens,
            "bare_early_exit_tok_per_s": tokens / baseline,
            "collection_tok_per_s": tokens / ours,
            "ratio": ratio,
            "target": 0.95,
        }
    )
    print(
        f"\ncollection of {' + '.join(hooks)}: {tokens / ours:,.0f} tok/s, {ratio:.1%} of a bare early-exit "
        f"forward ({tokens / baseline:,.0f} tok/s; target >= 95%)"
    )


def untrained_saes(d_in: int) -> dict:
    arch = load_plugins().get("sae", "topk")
    return {f"topk_{seed}": arch.build(d_in, arch.Params(d_sae=D_SAE, k=K), seed=seed).eval() for seed in range(N_SAES)}


def test_ce_kl_vs_suffix_forward(benchmark, smollm2, kjv_blocks):
    model, tokenizer = smollm2.model, smollm2.tokenizer
    blocks = kjv_blocks[:SPLICE_BLOCKS]
    hook = parse_hook(SPLICE_HOOK)
    tokens = blocks.numel()
    batches = [blocks[start : start + SPLICE_BATCH] for start in range(0, len(blocks), SPLICE_BATCH)]

    def prefixes() -> list[torch.Tensor]:
        return [prefix(model, ids, hook) for ids in batches]

    hidden = prefixes()  # also the warm-up
    prefix_seconds = best_of(prefixes, repeats=2)

    def bare_suffix() -> None:
        for h in hidden:
            suffix_logits(model, h, hook, None, None)

    bare_suffix()  # warm-up
    baseline = best_of(bare_suffix, repeats=2)

    # mean activation at the hook over the non-special tokens (for the mean-ablation baseline)
    total, count = torch.zeros(hidden[0].shape[-1], dtype=torch.float64), 0
    for ids in batches:
        acts = capture(model, ids, [hook])[hook][~special_mask(ids, tokenizer)]
        total += acts.double().sum(0)
        count += len(acts)
    mean = (total / count).float()

    saes = untrained_saes(hidden[0].shape[-1])
    memo = Prefixes(model)
    for ids in batches:  # the runner shares one prefix pass per batch between a model's splice metrics
        memo(ids, hook)
    ctx = SpliceContext(model, hook, blocks, tokenizer, CPU, saes, mean, prefixes=memo)
    metric = CEKL()
    params = CEKL.Params(max_tokens=tokens, batch_blocks=SPLICE_BATCH, resamples=10)

    results = benchmark.pedantic(lambda: metric.compute_spliced(ctx, params), rounds=2, iterations=1)
    assert set(results) == set(saes)
    ours = benchmark.stats.stats.min
    passes = 3 + N_SAES  # clean, zero-ablated, mean-ablated, each SAE
    bare_rate = tokens / baseline
    ratio = (passes * tokens / ours) / bare_rate
    ratio_with_prefix = (passes * tokens / (ours + prefix_seconds)) / bare_rate
    benchmark.extra_info.update(
        {
            "hook": SPLICE_HOOK,
            "tokens": tokens,
            "n_saes": N_SAES,
            "suffix_passes_per_batch": passes,
            "bare_suffix_seconds": baseline,
            "bare_suffix_tok_per_s": bare_rate,
            "ce_kl_seconds": ours,
            "ce_kl_tok_per_s_per_pass": passes * tokens / ours,
            "prefix_seconds": prefix_seconds,
            "ratio_per_pass": ratio,
            "ratio_per_pass_with_prefix": ratio_with_prefix,
            "target": 0.90,
        }
    )
    print(
        f"\nce_kl at {SPLICE_HOOK}, {N_SAES} SAEs ({passes} suffix passes/batch): {ours:.2f} s, "
        f"{passes * tokens / ours:,.0f} tok/s per pass, {ratio:.1%} of a bare suffix forward "
        f"({bare_rate:,.0f} tok/s; target >= 90%); prefix passes (one per batch) {prefix_seconds:.2f} s in all "
        f"({ratio_with_prefix:.1%} with it)"
    )
