"""Failures stay where they happen: an SAE that breaks splicing fails only its own cells, named; a raising
lifecycle hook is logged and loses nothing; a metric that is not a finite number is stored as null with the
reason; `saex report` refuses a file that is not a results store instead of turning it into one."""

from __future__ import annotations

import json
import sqlite3

import pytest
import yaml
from pydantic import BaseModel

from saex import hookimpl
from saex.cli import main
from saex.config.registry import load_registry
from saex.plugin.manager import load_plugins
from saex.report.markdown import phase_table
from saex.run.runner import Runner
from saex.storage.cache import Cache
from saex.storage.results import ResultsStore

REGISTRY = {
    "models": {"tiny": {"plugin": "tiny-llama", "params": {"num_hidden_layers": 2}}},
    "corpora": {"kjv": {"plugin": "kjv"}},
    "compressions": {"mag": {"plugin": "magnitude", "params": {"sparsity": 0.5}}},
    "saes": {
        "good": {"plugin": "topk", "params": {"expansion_factor": 2, "k": 4}, "training": {"tokens": 1024}},
        "bad": {"plugin": "relu", "params": {"expansion_factor": 2}, "training": {"tokens": 1024}},
    },
    "metrics": {"rec": {"plugin": "reconstruction"}, "picky": {"plugin": "picky"}, "nan": {"plugin": "nan"}},
    "matrices": {
        "m": {
            "models": ["tiny"],
            "corpus": "kjv",
            "compressions": ["mag"],
            "hooks": ["layers.1.resid_post"],
            "saes": ["good", "bad"],
            "sources": ["original"],
            "metrics": ["rec", "picky", "nan"],
            "tokens": {"train": 1024, "calibration": 256, "eval": 256},
            "block_size": 64,
            "device": "cpu",
        }
    },
}


class NoParams(BaseModel):
    model_config = {"extra": "forbid"}


class Picky:
    """A splice metric that cannot handle the SAE named ``bad`` (as a real metric might choke on one SAE)."""

    name = "picky"
    description = "test: fails for SAEs labelled bad/*"
    scope = "splice"
    Params = NoParams
    outputs = ()

    def compute_spliced(self, ctx, params):
        if any(label.startswith("bad/") for label in ctx.saes):
            raise ValueError("cannot splice this SAE")
        return {label: {"picky_ok": 1.0} for label in ctx.saes}


class NaNMetric:
    name = "nan"
    description = "test: a metric whose value is not a number"
    scope = "sae"
    Params = NoParams
    outputs = ()

    def compute(self, ctx, params):
        return {"always_nan": float("nan"), "always_inf": float("inf")}


class TestPlugins:
    @staticmethod
    @hookimpl
    def register_metrics(register):
        register(Picky())
        register(NaNMetric())

    @staticmethod
    @hookimpl
    def cell_started(cell):
        raise RuntimeError("a logger plugin crashed")

    @staticmethod
    @hookimpl
    def cell_finished(cell, result):
        raise RuntimeError("a logger plugin crashed again")


@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.setenv("SAEX_HOME", str(tmp_path / "home"))
    path = tmp_path / "reg.yaml"
    path.write_text(yaml.safe_dump(REGISTRY))
    plugins = load_plugins([("test", TestPlugins)], entry_points=False)
    registry = load_registry([path], plugins)
    logs: list[str] = []
    store = ResultsStore(tmp_path / "results.sqlite")
    runner = Runner(plugins, registry, store, Cache(tmp_path / "cache"), progress=False, log=logs.append)
    rows = {(r.cell["sae"], r.cell["compression"]): r for r in runner.run("m")}
    return rows, logs, tmp_path / "results.sqlite"


def test_an_sae_that_breaks_splicing_fails_only_its_own_cells(results):
    rows, _, _ = results
    assert {k: r.status for k, r in rows.items()} == {
        ("good", None): "done",
        ("good", "mag"): "done",
        ("bad", None): "failed",
        ("bad", "mag"): "failed",
    }
    assert rows[("good", "mag")].metrics["picky_ok"] == 1.0
    assert rows[("bad", "mag")].error == "splice metrics of SAE bad/original: ValueError: cannot splice this SAE"


def test_a_raising_lifecycle_hook_is_logged_and_loses_nothing(results):
    _, logs, store = results
    assert sum("plugin hook cell_started raised RuntimeError" in line for line in logs) == 4
    assert sum("plugin hook cell_finished raised RuntimeError" in line for line in logs) == 4
    with sqlite3.connect(store) as db:
        assert db.execute("select count(*) from cells where status = 'running'").fetchone()[0] == 0
    summaries = [line for line in logs if line.startswith("cell tiny layers.1.resid_post good/original on M: done (")]
    assert len(summaries) == 1 and "explained_variance " in summaries[0]  # one summary line per cell
    assert any("bad/original on M_c[mag]: failed: splice metrics of SAE bad/original" in line for line in logs)


def test_non_finite_metrics_are_null_with_a_reason_and_the_row_is_valid_json(results):
    rows, _, store = results
    good = rows[("good", "mag")]
    assert good.metrics["always_nan"] is None and good.metrics["always_inf"] is None
    assert {k: good.details["absent_metrics"][k] for k in ("always_nan", "always_inf")} == {
        "always_nan": "not a finite number (nan)",
        "always_inf": "not a finite number (inf)",
    }
    with sqlite3.connect(store) as db:
        (value,) = db.execute(
            "select json_extract(metrics, '$.always_nan') from cells where key = ?", (good.key,)
        ).fetchone()
        assert value is None
        for (metrics,) in db.execute("select metrics from cells"):
            json.loads(metrics, parse_constant=lambda c: pytest.fail(f"bare {c} in stored JSON"))


@pytest.mark.parametrize(
    "content,expected",
    [(b"", "not a saex results store"), (b"hello, not a database\n" * 50, "not a saex results store")],
)
def test_report_refuses_a_file_that_is_not_a_store(tmp_path, capsys, content, expected):
    path = tmp_path / "store.sqlite"
    path.write_bytes(content)
    assert main(["report", "--store", str(path)]) == 2
    assert expected in capsys.readouterr().err and path.read_bytes() == content  # never turned into a database


def test_report_refuses_a_database_of_another_schema(tmp_path, capsys):
    path = tmp_path / "other.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("create table cells (id integer)")
    assert main(["report", "--store", str(path)]) == 2
    assert "table 'cells' lacks key, matrix" in capsys.readouterr().err


def test_report_on_a_missing_store_is_exit_2(tmp_path, capsys):
    assert main(["report", "--store", str(tmp_path / "nothing.sqlite")]) == 2
    assert "no results store there" in capsys.readouterr().err
    assert not (tmp_path / "nothing.sqlite").exists()


def test_every_phase_of_a_run_is_timed_in_the_store_and_reported(results):
    _, _, store_path = results
    phases = {phase: times for _, phase, _, times in ResultsStore.existing(store_path).phase_totals("m")}
    for phase in (
        "load model",
        "token blocks",
        "activations M train",
        "activations M_c[mag] eval",
        "compress mag",
        "train SAE good on M",
        "model loss M",
        "per-SAE metrics on M",
        "splice metrics on M_c[mag]",
    ):
        assert phases.get(phase, 0) >= 1, (phase, phases)
    totals = ResultsStore.existing(store_path).phase_totals("m")
    table = phase_table(totals)
    assert "| tiny | compress mag |" in table
