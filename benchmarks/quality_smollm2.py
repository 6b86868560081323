"""SAE quality on the real model (docs/QUALITY.md): train registry SAEs on SmolLM2-135M activations at one hook
and score them on held-out eval activations with the `reconstruction` metric.

    python benchmarks/quality_smollm2.py [--hook layers.15.resid_post] [--saes topk-paper batchtopk-paper ...]
        [--train-blocks 512] [--registry extra.yaml]

Uses only the public harness API: the `smollm2` model and `kjv` corpus plugins, `token_blocks`,
`collect_activations` (cached under $SAEX_HOME/cache), `train_sae` with each entry's `training` config, and the
`reconstruction` metric. Besides the metric on every eval token it reports it on the "typical" tokens (norm
below 10x the median): SmolLM2's residual stream has a few massive-norm tokens (0.04% of tokens, ~87% of the
variance at layer 15) that dominate explained variance. Prints one JSON line per SAE.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from saex.config.registry import load_registry
from saex.data.corpus import token_blocks
from saex.model.activations import TensorActivations, collect_activations
from saex.model.hookpoints import parse_hook
from saex.plugin.manager import load_plugins
from saex.plugin.protocols import MetricContext
from saex.sae.training import train_sae
from saex.storage.cache import Cache
from saex.storage.home import saex_home

PROJECT_REGISTRY = Path(__file__).resolve().parent.parent / "registry.yaml"
TOKENS = {"train": 409_600, "calibration": 8192, "eval": 32_768}  # block budgets; --train-blocks takes a prefix
PAPER_SAES = ["topk-paper", "batchtopk-paper", "relu-paper", "jumprelu-paper"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hook", default="layers.15.resid_post")
    parser.add_argument("--saes", nargs="+", default=PAPER_SAES)
    parser.add_argument("--train-blocks", type=int, default=512, help="128-token train blocks to collect")
    parser.add_argument("--registry", action="append", type=Path, default=[])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    plugins = load_plugins()
    registry = load_registry([PROJECT_REGISTRY, *args.registry], plugins)
    cache, device = Cache(saex_home() / "cache"), torch.device("cpu")
    loaded = plugins.get("model", "smollm2").load(plugins.get("model", "smollm2").Params(), device)
    corpus = plugins.get("corpus", "kjv")
    blocks = token_blocks(
        cache,
        lambda: corpus.documents(corpus.Params()),
        corpus.fingerprint(corpus.Params()),
        loaded.tokenizer,
        128,
        TOKENS,
    )
    hook = parse_hook(args.hook)
    acts = {}
    for split, ids in (("train", blocks.split("train")[: args.train_blocks]), ("eval", blocks.split("eval"))):
        parts = {
            "model": loaded.fingerprint,
            "dtype": "float32",
            "tokens": blocks.key,
            "split": f"{split}[:{ids.shape[0]}]",
        }
        acts[split] = collect_activations(
            cache, loaded.model, loaded.tokenizer, ids, [hook], parts, device=device, desc=f"activations {split}"
        )[hook]
    x_eval = torch.cat(list(acts["eval"].iter_batches(8192)))
    norms = x_eval.norm(dim=-1)
    typical = TensorActivations(x_eval[norms < 10 * norms.median()])
    metric = plugins.get("metric", "reconstruction")

    for name in args.saes:
        resolved = registry.component("saes", name)
        sae = resolved.component.build(acts["train"].d_in, resolved.params, seed=args.seed)
        result = train_sae(sae, acts["train"], resolved.entry.training, device=device, progress=False)
        sae.eval()
        scores = {
            label: metric.compute(MetricContext(sae, source, device), metric.Params())
            for label, source in (("eval", acts["eval"]), ("eval_typical", typical))
        }
        print(
            json.dumps(
                {
                    "sae": name,
                    "architecture": resolved.entry.plugin,
                    "hook": args.hook,
                    "train_tokens_unique": acts["train"].n_tokens,
                    "tokens": result.tokens,
                    "seconds": round(result.seconds, 1),
                    **{
                        f"{label}_{k}": round(v, 4)
                        for label, s in scores.items()
                        for k, v in s.items()
                        if k in ("explained_variance", "l0", "dead_frac", "cos")
                    },
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
