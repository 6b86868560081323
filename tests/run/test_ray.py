"""The `ray` executor on local Ray instances the tests start and stop themselves, in a Ray temp folder of their
own (``RAY_TMPDIR``; /tmp/ray is never read or written): the same rows as `local`, with bit-identical metrics,
each cell computed once, each SAE trained once; a line per finished cell as it finishes; Ctrl-C is exit 130 with
one line, the cells done kept and the rest given back to the next run; a cluster that does not answer is exit 2
within seconds; a `ray_current_cluster` file left by an old `ray start` does not stop a local instance."""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from contextlib import suppress
from pathlib import Path

import pytest
import yaml

from saex import ExecutorError, WorkerSpec, worker_step
from saex.cli import main
from saex.config.registry import load_registry
from saex.plugin.manager import load_plugins
from saex.plugins.executors.ray import RayParams, worker_env
from saex.run.runner import Runner
from saex.storage.cache import Cache
from saex.storage.results import CellResult, ResultsStore
from saex.testing import doc_corpus

ray = pytest.importorskip("ray")


@pytest.fixture(autouse=True)
def ray_tmpdir(monkeypatch: pytest.MonkeyPatch):
    """A Ray temp folder of the test's own, short (Ray's socket paths must stay under ~100 characters), removed with
    whatever Ray left in it; ``RAY_ADDRESS`` unset, and ``RAY_AUTH_MODE`` (which a local ``ray.init`` sets in its
    own process) restored."""
    path = tempfile.mkdtemp(prefix="saex-ray-")
    monkeypatch.setenv("RAY_TMPDIR", path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    auth, shutdown = os.environ.get("RAY_AUTH_MODE"), ray.shutdown  # the real one, whatever a test patches
    yield Path(path)
    if ray.is_initialized():
        shutdown()
    os.environ.pop("RAY_AUTH_MODE", None)
    if auth is not None:
        os.environ["RAY_AUTH_MODE"] = auth
    shutil.rmtree(path, ignore_errors=True)


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


# --- the command line: progress, Ctrl-C, a cluster that does not answer, a stale cluster file ------------------

CLI_MATRIX = "rc"


def _cli_registry(tmp_path: Path, executors: dict | None = None) -> Path:
    """Six cells in four scoring groups (2 hooks x M / M_c), quick to train, over the standard library's docstrings
    (nothing to fetch: the run's ``SAEX_HOME`` is the test's); the executor ``rc-ray`` is a 1-CPU local instance."""
    corpus = doc_corpus(tmp_path / "corpus")
    registry = {
        "models": {"rc-tiny": {"plugin": "tiny-llama", "params": {"num_hidden_layers": 2}}},
        "corpora": {"rc-docs": {"plugin": "files", "params": {"paths": [str(corpus / "*.txt")]}}},
        "compressions": {"rc-mag": {"plugin": "magnitude", "params": {"sparsity": 0.5}}},
        "saes": {
            "rc-s": {
                "plugin": "topk",
                "params": {"expansion_factor": 2, "k": 4},
                "training": {"tokens": 1024, "batch_size": 256},
            }
        },
        "metrics": {"rc-rec": {"plugin": "reconstruction"}},
        "executors": {"rc-ray": {"plugin": "ray", "params": {"num_cpus": 1}}, **(executors or {})},
        "matrices": {
            CLI_MATRIX: {
                "models": ["rc-tiny"],
                "corpus": "rc-docs",
                "compressions": ["rc-mag"],
                "hooks": ["layers.0.resid_post", "layers.1.resid_post"],
                "saes": ["rc-s"],
                "sources": ["original", "retrained"],
                "metrics": ["rc-rec"],
                "tokens": {"train": 1024, "calibration": 256, "eval": 256},
                "block_size": 64,
                "device": "cpu",
            }
        },
    }
    path = tmp_path / "rc.yaml"
    path.write_text(yaml.safe_dump(registry))
    return path


def _args(registry: Path, store: Path, executor: str) -> list[str]:
    return ["run", CLI_MATRIX, "--registry", str(registry), "--store", str(store), "--executor", executor]


def _statuses(store: Path) -> list[tuple[str, str | None, str | None]]:
    with sqlite3.connect(store) as db:
        return db.execute("SELECT status, owner, error FROM cells").fetchall()


HANG_PLUGIN = """
import os, time
from pathlib import Path
from saex import hookimpl

MARKS = Path(os.environ["SAEX_TEST_MARKS"])

@hookimpl
def cell_finished(cell, result):
    (MARKS / "finished").touch()

@hookimpl
def cell_started(cell):  # claimed: the scoring group after the first one to finish hangs, its cells `running`
    if (MARKS / "finished").exists():
        (MARKS / "hanging").touch()
        time.sleep(300)
"""


def _hang_plugin(site: Path) -> None:
    """An installed plugin (entry point, found by the driver and by the workers through ``PYTHONPATH``) that holds
    the second scoring group to start, once its cells are claimed."""
    site.mkdir()
    (site / "saex_test_hang.py").write_text(HANG_PLUGIN)
    info = site / "saex_test_hang-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: saex-test-hang\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[saex]\nhang = saex_test_hang\n")


def test_ctrl_c_keeps_the_cells_done_and_the_next_run_computes_the_rest(tmp_path, monkeypatch, capsys):
    """Ctrl-C once one group's cells are done and the next group's are being computed: exit 130 with one line,
    the cells done kept, the cells being computed released (failed, with why) and computed by the next run."""
    registry, store, marks = _cli_registry(tmp_path), tmp_path / "rc.sqlite", tmp_path / "marks"
    _hang_plugin(tmp_path / "site")
    marks.mkdir()
    env = {
        **os.environ,
        "SAEX_HOME": str(tmp_path / "home"),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")]),
        "SAEX_TEST_MARKS": str(marks),
    }
    command = [sys.executable, "-m", "saex.cli", *_args(registry, store, "rc-ray"), "--no-progress"]
    run = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        before = []
        for line in run.stderr:
            before.append(line)
            if ": done (" in line:  # the first cell finished (printed as its group finishes, not at the end)
                break
        assert ": done (" in before[-1], "".join(before)
        deadline = time.monotonic() + 120
        while not (marks / "hanging").exists() and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (marks / "hanging").exists(), "".join(before)
        os.killpg(run.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: SIGINT to the foreground group
        after = run.stderr.read().splitlines()
        assert run.wait(timeout=120) == 130, after
    finally:
        with suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGKILL)  # anything of the run still there (nothing, when all went well)
        run.wait()
    assert "Traceback" not in "".join(after)
    assert all(line.startswith("saex: cell ") for line in after[:-1]), after  # the rest of the first group's cells
    rows = _statuses(store)
    done = sum(status == "done" for status, _, _ in rows)
    released = [(owner, error) for status, owner, error in rows if status == "failed"]
    assert done in (1, 2) and len(released) in (1, 2) and len(rows) == done + len(released)  # none left running
    assert after[-1] == f"saex: interrupted; {done} cells done are kept, {len(released)} released for the next run"
    assert all(owner is None and error.startswith("interrupted before it finished") for owner, error in released)

    monkeypatch.setenv("SAEX_HOME", str(tmp_path / "home"))
    assert main([*_args(registry, store, "local"), "--no-progress"]) == 0  # the next run computes the rest
    assert capsys.readouterr().err.startswith(f"saex: matrix {CLI_MATRIX}: 6 cells, {done} already done")
    assert [status for status, _, _ in _statuses(store)] == ["done"] * 6


def test_a_stale_cluster_file_still_starts_a_local_instance_and_ctrl_c_in_shutdown_keeps_every_cell(
    tmp_path, ray_tmpdir, monkeypatch, capsys
):
    """The file an old `ray start` left names a dead cluster: the run starts its own instance all the same (Ray
    used to go and connect to it, refusing num_cpus). Ctrl-C while that instance stops, every cell done: exit 130
    with every cell kept. Each cell is printed as its group finishes, the unchanged model as M."""
    stale = ray_tmpdir / "ray" / "ray_current_cluster"
    stale.parent.mkdir()
    stale.write_text("127.0.0.1:1")
    monkeypatch.setenv("SAEX_HOME", str(tmp_path / "home"))
    shutdown = ray.shutdown

    def interrupted_shutdown(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C as the instance stops
        shutdown(*args, **kwargs)

    monkeypatch.setattr(ray, "shutdown", interrupted_shutdown)
    store = tmp_path / "rc.sqlite"
    assert main([*_args(_cli_registry(tmp_path), store, "rc-ray"), "--no-progress"]) == 130
    assert not ray.is_initialized()
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == "saex: interrupted; 6 cells done are kept, 0 released for the next run"
    cells = [line for line in err if ": done (" in line]
    assert len(cells) == 6 and "None" not in "".join(err), err
    assert sum(" on M: done (" in line for line in cells) == 2
    assert sum(" on M_c[rc-mag]: done (" in line for line in cells) == 4
    assert [status for status, _, _ in _statuses(store)] == ["done"] * 6
    assert stale.read_text() == "127.0.0.1:1"  # Ray's file is left as it was


@pytest.mark.parametrize("scheme", ["", "ray://"])
def test_a_cluster_address_with_nothing_listening_is_exit_2_naming_it_within_seconds(
    tmp_path, monkeypatch, capsys, scheme
):
    with socket.socket() as probe:  # a port nothing listens on once the probe is closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    address = f"{scheme}127.0.0.1:{port}"
    registry = _cli_registry(tmp_path, {"rc-far": {"plugin": "ray", "params": {"address": address}}})
    monkeypatch.setenv("SAEX_HOME", str(tmp_path / "home"))
    started = time.perf_counter()
    assert main([*_args(registry, tmp_path / "rc.sqlite", "rc-far"), "--no-progress"]) == 2
    seconds = time.perf_counter() - started
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith(f"saex: error: ray: cannot join the Ray cluster at {address}"), err
    assert "connection refused" in err[-1] and "RAY_AUTH_TOKEN" in err[-1]
    assert seconds < 20, seconds  # Ray alone retries for minutes
    assert not ray.is_initialized()
    assert "Traceback" not in "\n".join(err)


def test_bad_input_a_worker_finds_travels_back_to_the_driver_intact(tmp_path, monkeypatch):
    """Ray hands the driver what a task raised by pickling it; a RegistryError does not survive that (Ray replaces
    it by an UnserializableException: a traceback and exit 1), an ExecutorError with the same message does."""
    registry = _cli_registry(tmp_path)
    data = yaml.safe_load(registry.read_text())
    data["matrices"][CLI_MATRIX]["tokens"]["eval"] = 1_000_000  # more than the corpus holds: found once it is read
    registry.write_text(yaml.safe_dump(data))
    monkeypatch.setenv("SAEX_HOME", str(tmp_path / "home"))
    spec = WorkerSpec((str(registry),), CLI_MATRIX, frozenset(), str(tmp_path / "s.sqlite"), str(tmp_path / "c"), "cpu")
    with pytest.raises(ExecutorError) as raised:
        worker_step(spec, "rc-tiny", None, None)
    travelled = pickle.loads(pickle.dumps(raised.value))
    assert type(travelled) is ExecutorError and str(travelled) == str(raised.value)
    assert str(travelled).startswith(f"{registry}: matrices.{CLI_MATRIX}.tokens: the corpus is too small")


def test_ctrl_c_in_any_run_is_exit_130_with_one_line(tmp_path, monkeypatch, capsys):
    """The mapping in ``saex.cli.main`` covers every executor (here Ctrl-C stands for a local run's)."""

    def interrupted(self, name, executor="local"):
        raise KeyboardInterrupt

    monkeypatch.setattr(Runner, "run", interrupted)
    monkeypatch.setenv("SAEX_HOME", str(tmp_path / "home"))
    assert main([*_args(_cli_registry(tmp_path), tmp_path / "rc.sqlite", "local"), "--no-progress"]) == 130
    assert capsys.readouterr().err.splitlines() == [
        "saex: interrupted; cells done so far are kept, the rest are computed by the next run"
    ]


def test_num_cpus_is_for_a_local_instance_only():
    RayParams(num_cpus=2)
    RayParams(address="local", num_cpus=2)
    RayParams(address="head:6379")
    with pytest.raises(ValueError, match="num_cpus sizes a local instance"):
        RayParams(address="head:6379", num_cpus=2)


def test_the_saex_variables_the_driver_has_reach_the_workers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SAEX_HOME", "home")
    monkeypatch.setenv("SAEX_DISABLE_PLUGINS", "metrics.thing")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("SAEX_PLUGINS", raising=False)
    assert worker_env() == {
        "SAEX_HOME": str(tmp_path / "home"),  # absolute: workers do not start in the driver's folder
        "SAEX_DISABLE_PLUGINS": "metrics.thing",
        "OMP_NUM_THREADS": "1",
    }


def test_release_gives_back_only_this_process_s_unfinished_claims(tmp_path):
    store, other = ResultsStore(tmp_path / "s.sqlite"), ResultsStore(tmp_path / "s.sqlite")
    other.owner = "elsewhere:1"
    for key in ("a", "b", "c"):
        assert store.claim(key, "m", {}, {})
    assert other.claim("d", "m", {}, {})
    store.finish(CellResult("a", "m", {}, "done"))
    assert store.release(["a", "b", "d"], "interrupted") == 1  # a is done, c not asked for, d someone else's
    rows = {r.key: (r.status, r.error) for r in store.rows()}
    assert rows == {"a": ("done", None), "b": ("failed", "interrupted"), "c": ("running", None), "d": ("running", None)}
    assert store.claim("b", "m", {}, {})  # the next run takes it
