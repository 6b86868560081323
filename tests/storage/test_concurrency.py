"""Two `saex run` processes on one store and cache cooperate: every cell is computed by exactly one of them
(claimed in the store), shared artifacts are computed once (locked in the cache), both finish with the same
rows; and a claim left by a process that died is taken over."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import yaml

from saex.storage.results import ResultsStore

REGISTRY = {
    "models": {"cc-tiny": {"plugin": "tiny-llama", "params": {"num_hidden_layers": 2}}},
    "corpora": {"cc-kjv": {"plugin": "kjv"}},
    "compressions": {"cc-mag": {"plugin": "magnitude", "params": {"sparsity": 0.5}}},
    "saes": {"cc-s": {"plugin": "topk", "params": {"expansion_factor": 2, "k": 4}, "training": {"tokens": 4096}}},
    "metrics": {"cc-rec": {"plugin": "reconstruction"}},
    "matrices": {
        "cc": {
            "models": ["cc-tiny"],
            "corpus": "cc-kjv",
            "compressions": ["cc-mag"],
            "hooks": ["layers.0.resid_post", "layers.1.resid_post"],
            "saes": ["cc-s"],
            "metrics": ["cc-rec"],
            "tokens": {"train": 4096, "calibration": 256, "eval": 512},
            "block_size": 64,
            "device": "cpu",
        }
    },
}


def _start(tmp_path: Path, registry: Path, store: Path, name: str) -> subprocess.Popen:
    env = {**os.environ, "SAEX_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "saex.cli", "run", "cc", "--registry", str(registry), "--store", str(store)]
    return subprocess.Popen(
        [*args, "--no-progress"], env=env, stdout=subprocess.PIPE, stderr=open(tmp_path / f"{name}.log", "w")
    )


def test_two_runs_on_one_store_compute_each_cell_once(tmp_path):
    registry = tmp_path / "reg.yaml"
    registry.write_text(yaml.safe_dump(REGISTRY))
    store = tmp_path / "results.sqlite"
    runs = [_start(tmp_path, registry, store, name) for name in ("a", "b")]
    assert [run.wait(timeout=600) for run in runs] == [0, 0]
    logs = [(tmp_path / f"{name}.log").read_text() for name in ("a", "b")]
    with sqlite3.connect(store) as db:
        rows = db.execute("select status, attempts from cells").fetchall()
    assert len(rows) == 6 and set(rows) == {("done", 1)}  # 2 hooks x (original on M, original and retrained on M_c)
    computed = sum(log.count(": done (") for log in logs)  # one summary line per cell a process computed
    assert computed == 6, logs
    saes = [p for p in (tmp_path / "home" / "cache" / "saes").iterdir() if not p.name.startswith(".")]
    assert len(saes) == 4  # original and retrained per hook, each trained once


def test_a_claim_of_a_dead_process_expires(tmp_path):
    path = tmp_path / "results.sqlite"
    dead = subprocess.Popen(["true"])
    dead.wait()
    first = ResultsStore(path)
    assert first.claim("k", "m", {}, {})
    first.db.execute("update cells set owner = ? where key = 'k'", (f"{first.owner.rsplit(':', 1)[0]}:{dead.pid}",))
    second = ResultsStore(path)
    assert not second.waiting_on_others("k") and second.claim("k", "m", {}, {})
    with sqlite3.connect(path) as db:
        assert db.execute("select owner, attempts from cells").fetchone() == (second.owner, 2)


def test_a_live_claim_is_respected(tmp_path):
    path = tmp_path / "results.sqlite"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        first = ResultsStore(path)
        assert first.claim("k", "m", {}, {})
        owner = f"{first.owner.rsplit(':', 1)[0]}:{sleeper.pid}"
        first.db.execute("update cells set owner = ? where key = 'k'", (owner,))
        second = ResultsStore(path)
        assert second.waiting_on_others("k") and not second.claim("k", "m", {}, {})
    finally:
        sleeper.kill()
        sleeper.wait()
