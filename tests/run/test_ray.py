"""The `ray` executor on a local Ray instance the test starts and stops itself: the same rows as `local`, with
bit-identical metrics, each cell computed once, each SAE trained once."""

from __future__ import annotations

import sqlite3

import pytest
import yaml

from saex.config.registry import load_registry
from saex.plugin.manager import load_plugins
from saex.run.runner import Runner
from saex.storage.cache import Cache
from saex.storage.results import ResultsStore

ray = pytest.importorskip("ray")

REGISTRY = {
    "models": {"ray-tiny": {"plugin": "tiny-llama", "params": {"num_hidden_layers": 2}}},
    "corpora": {"ray-kjv": {"plugin": "kjv"}},
    "compressions": {
        "ray-mag": {"plugin": "magnitude", "params": {"sparsity": 0.5}},
        "ray-2of4": {"plugin": "magnitude", "params": {"pattern": "2:4"}},
    },
    "saes": {"ray-s": {"plugin": "topk", "params": {"expansion_factor": 2, "k": 4}, "training": {"tokens": 2048}}},
    "pruners": {"ray-p": {"plugin": "magnitude"}},
    "metrics": {
        "ray-rec": {"plugin": "reconstruction"},
        "ray-cekl": {"plugin": "ce_kl", "params": {"max_tokens": 256}},
    },
    "executors": {"ray-2": {"plugin": "ray", "params": {"num_cpus": 2}}},
    "matrices": {
        "r": {
            "models": ["ray-tiny"],
            "corpus": "ray-kjv",
            "compressions": ["ray-mag", "ray-2of4"],
            "hooks": ["layers.0.resid_post", "layers.1.resid_post"],
            "saes": ["ray-s"],
            "sources": ["original", "retrained", "pruned:ray-p@0.5"],
            "metrics": ["ray-rec", "ray-cekl"],
            "tokens": {"train": 2048, "calibration": 256, "eval": 256},
            "block_size": 64,
            "device": "cpu",
        }
    },
}


def _run(tmp_path, name: str, executor: str) -> dict:
    registry_file = tmp_path / "reg.yaml"
    registry_file.write_text(yaml.safe_dump(REGISTRY))
    plugins = load_plugins(entry_points=False)
    registry = load_registry([registry_file], plugins)
    store = ResultsStore(tmp_path / f"{name}.sqlite")
    runner = Runner(plugins, registry, store, Cache(tmp_path / name / "cache"), progress=False, log=lambda m: None)
    results = runner.run("r", executor)
    return {r.key: r for r in results}


def test_ray_gives_the_local_rows_bit_for_bit(tmp_path):
    local = _run(tmp_path, "local", "local")
    distributed = _run(tmp_path, "ray", "ray-2")
    assert len(local) == 14 and set(local) == set(distributed)  # 2 hooks x (original on M + 3 sources x 2 M_c)
    assert {r.status for r in distributed.values()} == {"done"}
    for key, row in local.items():
        assert distributed[key].metrics == row.metrics, row.cell
    with sqlite3.connect(tmp_path / "ray.sqlite") as db:
        assert db.execute("select distinct attempts from cells").fetchall() == [(1,)]
    saes = [p for p in (tmp_path / "ray" / "cache" / "saes").iterdir() if not p.name.startswith(".")]
    assert len(saes) == 2 + 2 * 2 * 2  # originals per hook; retrained and pruned per hook and compression
    assert not ray.is_initialized()  # the executor stopped the instance it started
