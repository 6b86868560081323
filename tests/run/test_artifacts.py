"""The runner's artifacts without a matrix run: each SAE is trained, cached and loaded once per run (a pruned
SAE reuses the original in memory), and a second run finds everything in the cache."""

from __future__ import annotations

import pytest
import torch
import yaml

import saex.run.sae_artifacts
from saex.config.registry import MatrixEntry, load_registry
from saex.config.sources import parse_source
from saex.data.corpus import token_blocks
from saex.model.hookpoints import HookPoint
from saex.plugin.manager import load_plugins
from saex.plugins.corpora.files import LocalFiles
from saex.run.artifacts import Artifacts, Setting
from saex.storage.cache import Cache

HOOK = HookPoint(1, "resid_post")


@pytest.fixture
def registry(tmp_path):
    data = {
        "saes": {"s": {"plugin": "topk", "params": {"expansion_factor": 2, "k": 4}, "training": {"tokens": 1024}}},
        "pruners": {"mag": {"plugin": "magnitude"}},
        "compressions": {"half": {"plugin": "magnitude", "params": {"sparsity": 0.5}}},
    }
    path = tmp_path / "reg.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_registry([path], load_plugins(entry_points=False))


def _artifacts(tmp_path, tiny_llama, text_corpus, registry) -> Artifacts:
    corpus = LocalFiles()
    params = LocalFiles.Params(paths=[str(text_corpus / "*.txt")])
    cache = Cache(tmp_path / "cache")
    budgets = {"train": 1024, "calibration": 256, "eval": 256}
    blocks = token_blocks(
        cache,
        lambda: corpus.documents(params),
        corpus.fingerprint(params),
        tiny_llama.tokenizer,
        64,
        budgets,
        progress=False,
    )
    matrix = MatrixEntry(models=[], corpus="", compressions=[], hooks=[], saes=[], metrics=[])
    setting = Setting(matrix, tiny_llama, blocks, [HOOK], torch.device("cpu"))
    plugins = load_plugins(entry_points=False)
    architectures = {n: plugins.get("sae", n) for n in plugins.names("sae")}
    return Artifacts(cache, setting, architectures, progress=False, log=lambda m: None)


def test_each_sae_is_loaded_once_per_run_and_cached_across_runs(
    tmp_path, tiny_llama, text_corpus, registry, monkeypatch
):
    loads = []
    real_load = saex.run.sae_artifacts.load_sae
    monkeypatch.setattr(saex.run.sae_artifacts, "load_sae", lambda *a: loads.append(a[0]) or real_load(*a))
    artifacts = _artifacts(tmp_path, tiny_llama, text_corpus, registry)
    sae, pruner = registry.component("saes", "s"), registry.component("pruners", "mag")
    target = artifacts.compressed(registry.component("compressions", "half"))
    original = artifacts.saes.sae(parse_source("original"), sae, artifacts.base, HOOK)
    pruned = artifacts.saes.sae(parse_source("pruned:mag@0.5"), sae, target, HOOK, pruner)
    again = artifacts.saes.sae(parse_source("pruned:mag@0.5"), sae, target, HOOK, pruner)
    assert again is pruned and artifacts.saes.trained(sae, artifacts.base, HOOK) is original
    assert len(loads) == 2  # the original and the pruned SAE, each once
    assert pruned.details["pruning"]["achieved"]["sparsity"] == pytest.approx(0.5)
    assert pruned.cost["original_sae_seconds"] == original.cost["sae_seconds"]
    fresh = _artifacts(tmp_path, tiny_llama, text_corpus, registry)  # a second run: everything from the cache
    cached = fresh.saes.sae(parse_source("original"), sae, fresh.base, HOOK)
    assert cached.key == original.key and cached.cost["sae_seconds"] == original.cost["sae_seconds"]
    torch.testing.assert_close(cached.sae.W_dec, original.sae.W_dec, rtol=0, atol=0)
