"""The runner end to end on a tiny random Llama: cells, verification stored with results, resume, no
overwrite, the lifecycle hooks, and a third-party compression used in a matrix."""

import importlib.util
import math
import shutil
import sqlite3
from pathlib import Path

import pytest
import yaml
from conftest import tiny3_matrix, tiny3_sections

from saex.cli import main
from saex.config.registry import load_registry
from saex.model.verify import linear_layers
from saex.plugin.hookspecs import hookimpl
from saex.plugin.manager import load_plugins
from saex.plugin.protocols import CompressionExpectation, NoParams
from saex.run.runner import Runner
from saex.storage.cache import Cache
from saex.storage.results import ResultsStore

FIXTURES = Path(__file__).parents[1] / "fixtures"


@pytest.fixture
def registry_file(tmp_path, text_corpus):
    data = {
        **tiny3_sections(text_corpus, 4096),
        "compressions": {
            "id": {"plugin": "none"},
            "mag": {"plugin": "magnitude", "params": {"sparsity": 0.5}},
        },
        "metrics": {
            "rec": {"plugin": "reconstruction"},
            "tr": {"plugin": "transfer"},
            "cekl": {"plugin": "ce_kl", "params": {"max_tokens": 512}},
        },
        "matrices": {
            "t": tiny3_matrix(
                compressions=["id", "mag"],
                hooks=["layers.1.resid_post", "layers.0.mlp_out"],
                metrics=["rec", "tr", "cekl"],
                tokens={"train": 4096, "calibration": 512, "eval": 1024},
            )
        },
    }
    path = tmp_path / "reg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


class Recorder:
    def __init__(self):
        self.started, self.finished = [], []

    @hookimpl
    def cell_started(self, cell):
        self.started.append(cell)

    @hookimpl
    def cell_finished(self, cell, result):
        self.finished.append((cell, result.status))


def make_runner(tmp_path, registry_file, recorder=None):
    plugins = load_plugins([("recorder", recorder)] if recorder else None, entry_points=False)
    registry = load_registry([registry_file], plugins)
    store = ResultsStore(tmp_path / "results.sqlite")
    return Runner(plugins, registry, store, Cache(tmp_path / "cache"), progress=False, log=lambda m: None)


def by_label(results):
    return {(r.cell["hook"], r.cell["source"], r.cell["compression"]): r for r in results}


def test_matrix_runs_every_cell_with_verified_compression(tmp_path, registry_file):
    recorder = Recorder()
    results = make_runner(tmp_path, registry_file, recorder).run("t")
    # 2 hooks x (original on M + 2 compressions x (original, retrained))
    assert len(results) == 10 and all(r.status == "done" for r in results)
    assert len(recorder.started) == 10 and {s for _, s in recorder.finished} == {"done"}
    cells = by_label(results)
    for hook in ("layers.1.resid_post", "layers.0.mlp_out"):
        on_m = cells[(hook, "original", None)].metrics
        # `none` is the identity: the original SAE scores the same on M and on M_c[id], and retraining on
        # the same activations with the same seed gives the same SAE; transfer metrics of an SAE compared
        # with itself are perfect
        same = cells[(hook, "original", "id")].metrics
        retrained = cells[(hook, "retrained", "id")].metrics
        for key, value in on_m.items():
            assert same[key] == value and retrained[key] == value
        assert same["freq_shift_mean_abs"] == 0 and same["act_corr_mean"] == pytest.approx(1)
        assert retrained["dec_match_mean_max_cos"] == pytest.approx(1) and retrained["dec_match_share_above_0.7"] == 1
        assert 0 < on_m["explained_variance"] <= 1 and on_m["l0"] <= 8
        assert on_m["ce_clean"] == pytest.approx(on_m["model_ce"], rel=0.05)  # 512 of the 1024 eval tokens
        assert math.isfinite(on_m["ce_loss_score"]) and on_m["kl_sae"] >= 0  # a random model: ablation barely matters
        assert math.isfinite(on_m["ce_loss_score_mean"]) and on_m["kl_mean_ablated"] > 0  # the runner gives the mean
        pruned = cells[(hook, "original", "mag")]
        layers = pruned.details["compression"]["layers"]
        assert len(layers) == 3 * 7 and all(abs(layer["sparsity"] - 0.5) < 1e-3 for layer in layers)
        assert pruned.metrics["explained_variance"] != on_m["explained_variance"]
        assert pruned.metrics["ce_clean"] != on_m["ce_clean"]  # scored against M_c's own clean run
        assert pruned.cost["sae_seconds"] == cells[(hook, "original", None)].cost["sae_seconds"] > 0
        assert cells[(hook, "retrained", "mag")].cost["activation_seconds"] > 0  # M_c's collection pass


def test_rerun_skips_finished_cells_and_overwrites_nothing(tmp_path, registry_file):
    first = make_runner(tmp_path, registry_file).run("t")
    db = sqlite3.connect(tmp_path / "results.sqlite")
    before = db.execute("SELECT key, metrics, finished_at FROM cells ORDER BY key").fetchall()
    recorder = Recorder()
    second = make_runner(tmp_path, registry_file, recorder).run("t")
    assert recorder.started == []
    assert db.execute("SELECT key, metrics, finished_at FROM cells ORDER BY key").fetchall() == before
    assert [r.metrics for r in second] == [r.metrics for r in first]
    assert not ResultsStore(tmp_path / "results.sqlite").claim(before[0][0], "t", {}, {})  # never overwritten
    assert db.execute("SELECT key, metrics, finished_at FROM cells ORDER BY key").fetchall() == before


def test_failed_compression_fails_its_cells_and_is_retried(tmp_path, registry_file):
    data = yaml.safe_load(registry_file.read_text())
    # a plugin that promises sparsity but changes nothing must be caught by the per-layer check
    data["compressions"]["lazy"] = {"plugin": "lazy"}
    data["matrices"]["t"]["compressions"] = ["lazy"]
    data["matrices"]["t"]["hooks"] = ["layers.1.resid_post"]
    registry_file.write_text(yaml.safe_dump(data))

    class Lazy:
        """Promises 50% sparsity in every decoder Linear layer and does nothing."""

        name, description, Params = "lazy", "does nothing", NoParams

        def compress(self, model, params, ctx):
            return model

        def expectation(self, model, params):
            return CompressionExpectation(sparsity=0.5, targets=list(linear_layers(model)))

        @hookimpl
        def register_compressors(self, register):
            register(self)

    plugins = load_plugins([("lazy", Lazy())], entry_points=False)
    runner = Runner(
        plugins,
        load_registry([registry_file], plugins),
        ResultsStore(tmp_path / "r.sqlite"),
        Cache(tmp_path / "cache"),
        progress=False,
        log=lambda m: None,
    )
    results = by_label(runner.run("t"))
    assert results[("layers.1.resid_post", "original", None)].status == "done"
    failed = results[("layers.1.resid_post", "original", "lazy")]
    assert failed.status == "failed" and "layer stayed dense" in failed.error
    assert len(failed.details["compression"]["layers"]) == 21
    again = by_label(runner.run("t"))
    assert again[("layers.1.resid_post", "retrained", "lazy")].status == "failed"
    attempts = sqlite3.connect(tmp_path / "r.sqlite").execute("SELECT max(attempts) FROM cells").fetchone()[0]
    assert attempts == 2


def test_third_party_compression_in_a_matrix(tmp_path, registry_file, monkeypatch):
    spec = importlib.util.spec_from_file_location("saex_scale_plugin", FIXTURES / "saex_scale_plugin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    data = yaml.safe_load(registry_file.read_text())
    data["compressions"] = {"half": {"plugin": "scale", "params": {"factor": 0.5}}}
    data["matrices"]["t"].update(compressions=["half"], hooks=["layers.1.resid_post"], sources=["original"])
    registry_file.write_text(yaml.safe_dump(data))
    plugins = load_plugins([("scale", module)], entry_points=False)
    runner = Runner(
        plugins,
        load_registry([registry_file], plugins),
        ResultsStore(tmp_path / "r.sqlite"),
        Cache(tmp_path / "cache"),
        progress=False,
        log=lambda m: None,
    )
    results = by_label(runner.run("t"))
    scaled = results[("layers.1.resid_post", "original", "half")]
    assert scaled.status == "done"
    assert all(abs(layer["rel_error"] - 0.5) < 1e-6 for layer in scaled.details["compression"]["layers"])


def test_cli_run_then_report(tmp_path, registry_file, monkeypatch, capsys):
    monkeypatch.setenv("SAEX_HOME", str(tmp_path / "home"))
    store = tmp_path / "cli.sqlite"
    assert main(["run", "t", "--registry", str(registry_file), "--store", str(store), "--no-progress"]) == 0
    captured = capsys.readouterr()
    out, log = captured.out, captured.err.splitlines()
    assert out.startswith("matrix t: 10 cells, 10 done\n")  # the compact summary (saex.report.summary)
    # with progress bars off, the log is the matrix's line and one line per finished cell, nothing else
    assert log[0].startswith("saex: matrix t: 10 cells, 0 already done, 10 to run")
    assert len(log) == 11 and all(line.startswith("saex: cell ") and ": done (" in line for line in log[1:])
    assert main(["report", "t", "--registry", str(registry_file), "--store", str(store)]) == 0
    assert capsys.readouterr().out == out  # the same view from the store
    assert main(["report", "t", "--registry", str(registry_file), "--store", str(store), "--full"]) == 0
    report = capsys.readouterr().out
    assert report.count("| done |") == 10 and "mean sparsity" in report


def test_hook_beyond_the_model_is_a_registry_error_with_exit_2(tmp_path, registry_file, monkeypatch, capsys):
    """Only the loaded model knows its depth, so this is caught at run time, still as bad input."""
    monkeypatch.setenv("SAEX_HOME", str(tmp_path / "home"))
    data = yaml.safe_load(registry_file.read_text())
    data["matrices"]["t"]["hooks"] = ["layers.1.resid_post", "layers.3.mlp_out"]
    registry_file.write_text(yaml.safe_dump(data))
    store = tmp_path / "cli.sqlite"
    assert main(["run", "t", "--registry", str(registry_file), "--store", str(store), "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert f"{registry_file}: matrices.t.hooks[1]: model 'tiny3'" in error and "valid layers 0..2" in error


def test_compressed_model_is_cached_and_resumed_runs_do_not_compress(tmp_path, registry_file):
    from saex.plugins.compression.magnitude import Magnitude

    calls = []

    class Counting(Magnitude):
        name = "counting"

        def compress(self, model, params, ctx):
            calls.append(1)
            return super().compress(model, params, ctx)

    class Plugin:
        @hookimpl
        def register_compressors(self, register):
            register(Counting())

    data = yaml.safe_load(registry_file.read_text())
    data["compressions"] = {"cm": {"plugin": "counting", "params": {"sparsity": 0.5}}}
    data["matrices"]["t"].update(compressions=["cm"], hooks=["layers.1.resid_post"])
    registry_file.write_text(yaml.safe_dump(data))

    def run(store, cache):
        plugins = load_plugins([("counting", Plugin())], entry_points=False)
        runner = Runner(
            plugins,
            load_registry([registry_file], plugins),
            ResultsStore(store),
            Cache(cache),
            progress=False,
            log=lambda m: None,
        )
        return by_label(runner.run("t"))

    first = run(tmp_path / "a.sqlite", tmp_path / "cache")
    assert len(calls) == 1  # two SAE sources, one compression
    second = run(tmp_path / "b.sqlite", tmp_path / "cache")  # a new store, the same cache: nothing to compress
    assert len(calls) == 1
    for label, row in first.items():
        assert second[label].metrics == row.metrics
    # the reloaded weights give the same model: drop cached activations and scores, keep the compressed weights
    for kind in ("activations", "lm", "saes"):
        shutil.rmtree(tmp_path / "cache" / kind)
    third = run(tmp_path / "c.sqlite", tmp_path / "cache")
    assert len(calls) == 1
    assert (
        third[("layers.1.resid_post", "original", "cm")].metrics
        == first[("layers.1.resid_post", "original", "cm")].metrics
    )
    assert third[("layers.1.resid_post", "original", "cm")].details["compression"]["from_cache"] is True
    assert first[("layers.1.resid_post", "original", "cm")].metrics["model_ppl"] > 1


def test_two_sae_architectures_in_one_group_are_each_spliced(tmp_path, registry_file):
    """Cells of one (scored model, hook) with the same source but different SAEs are scored each with its own
    SAE: the same CE/KL as when each architecture runs alone."""
    data = yaml.safe_load(registry_file.read_text())
    data["saes"]["other"] = {
        "plugin": "relu",
        "params": {"expansion_factor": 2},
        "training": {"tokens": 4096, "batch_size": 256, "lr": 0.003},
    }
    data["matrices"]["t"].update(compressions=["mag"], hooks=["layers.1.resid_post"], saes=["small", "other"])
    data["matrices"]["alone"] = {**data["matrices"]["t"], "saes": ["small"]}
    registry_file.write_text(yaml.safe_dump(data))
    runner = make_runner(tmp_path, registry_file)
    both = {(r.cell["sae"], r.cell["source"], r.cell["scored_on"]): r.metrics for r in runner.run("t")}
    assert len(both) == 6
    for key, metrics in both.items():
        assert math.isfinite(metrics["kl_div_score"]), key
    alone = make_runner(tmp_path / "second", registry_file)  # a fresh store and cache
    for r in alone.run("alone"):
        mine = both[(r.cell["sae"], r.cell["source"], r.cell["scored_on"])]
        assert mine["kl_sae"] == pytest.approx(r.metrics["kl_sae"], rel=1e-6)
    assert both[("small", "original", "base")]["kl_sae"] != both[("other", "original", "base")]["kl_sae"]


def test_none_shares_the_activations_and_saes_of_m(tmp_path, registry_file):
    """``none`` promises an unchanged model: M_c[none] reuses M's activations and its `retrained` SAE is M's
    original, so a matrix with only ``none`` trains one SAE and collects each split once."""
    data = yaml.safe_load(registry_file.read_text())
    data["matrices"]["t"].update(compressions=["id"], hooks=["layers.1.resid_post"])
    registry_file.write_text(yaml.safe_dump(data))
    results = by_label(make_runner(tmp_path, registry_file).run("t"))
    assert all(r.status == "done" for r in results.values())
    cache = tmp_path / "cache"
    assert len(list((cache / "saes").iterdir())) == 1
    assert len(list((cache / "activations").iterdir())) == 2  # train and eval of M (no calibration needed)
    assert not list((cache / "compressed").rglob("*.safetensors"))  # M's weights are not stored again for it
    original = results[("layers.1.resid_post", "original", None)]
    retrained = results[("layers.1.resid_post", "retrained", "id")]
    assert {k: retrained.metrics[k] for k in original.metrics} == original.metrics and retrained.cost == original.cost
    assert retrained.metrics["dec_match_mean_max_cos"] == pytest.approx(1)  # the same SAE


def test_a_compression_that_breaks_its_unchanged_promise_fails():
    from saex.model.verify import LayerReport, check_expectation
    from saex.plugin.protocols import CompressionExpectation

    moved = LayerReport(
        name="model.layers.0.mlp.up_proj", shape=(8, 4), n_params=32, sparsity=0.0, rel_error=0.01, module_type="Linear"
    )
    problems = check_expectation([moved], CompressionExpectation(unchanged=True))
    assert problems == [
        "model.layers.0.mlp.up_proj: weights changed (relative error 0.01), though the compression "
        "promised to leave the model unchanged"
    ]
    assert check_expectation([moved], CompressionExpectation()) == []


def test_pruned_sources_are_calibrated_on_the_compressed_model(tmp_path, registry_file):
    data = yaml.safe_load(registry_file.read_text())
    data["matrices"]["t"].update(
        compressions=["mag"],
        hooks=["layers.1.resid_post"],
        sources=["original", "pruned:wanda@0.5", "pruned:magnitude@0.25", "pruned:latents@0.5"],
    )
    data["pruners"] = {
        "wanda": {"plugin": "wanda"},
        "magnitude": {"plugin": "magnitude"},
        "latents": {"plugin": "latents"},
    }
    registry_file.write_text(yaml.safe_dump(data))
    results = by_label(make_runner(tmp_path, registry_file).run("t"))
    assert len(results) == 5 and {r.status for r in results.values()} == {"done"}  # original on M and M_c, 3 pruned
    hook = "layers.1.resid_post"
    wanda, magnitude, latents = (
        results[(hook, s, "mag")] for s in ("pruned:wanda@0.5", "pruned:magnitude@0.25", "pruned:latents@0.5")
    )
    assert wanda.details["pruning"]["achieved"]["sparsity_W_enc"] == pytest.approx(0.5)
    assert magnitude.details["pruning"]["achieved"]["sparsity"] == pytest.approx(0.25)
    assert latents.details["pruning"]["achieved"]["d_sae"] == 64 and latents.details["pruning"]["achieved"][
        "sparsity"
    ] == pytest.approx(0.5)
    # calibration split of M_c: 512 tokens less the BOS of each 64-token block
    assert wanda.cost["calibration_tokens"] == 512 - 8 and wanda.cost["prune_seconds"] > 0
    # a latent-pruned SAE keeps exact copies of original decoder rows
    assert latents.metrics["dec_match_mean_max_cos"] == pytest.approx(1)
    # every SAE on M_c is scored against the same clean run
    assert len({r.metrics["ce_clean"] for r in results.values() if r.cell["compression"] == "mag"}) == 1


def test_loaded_sae_in_saelens_format_is_scored_on_m_and_m_c(tmp_path, registry_file):
    from saex.plugins.sae.topk import TopKSAE
    from saex.sae.saelens import save_saelens

    saved = tmp_path / "external-sae"
    save_saelens(TopKSAE.build(64, TopKSAE.Params(d_sae=96, k=6, normalize_input=False), seed=3), saved)
    data = yaml.safe_load(registry_file.read_text())
    data["matrices"]["t"].update(compressions=["mag"], hooks=["layers.1.resid_post"], sources=[f"loaded:{saved}"])
    registry_file.write_text(yaml.safe_dump(data))
    results = by_label(make_runner(tmp_path, registry_file).run("t"))
    hook, source = "layers.1.resid_post", f"loaded:{saved}"
    on_m, on_mc = results[(hook, source, None)], results[(hook, source, "mag")]
    assert on_m.status == on_mc.status == "done"
    assert on_m.metrics["l0"] == 6 and on_mc.metrics["l0"] == 6  # an untrained TopK fires exactly k latents
    assert "freq_shift_mean_abs" in on_mc.metrics and "freq_shift_mean_abs" not in on_m.metrics


def test_loaded_source_must_exist(tmp_path, registry_file):
    from saex.config.registry import RegistryError

    data = yaml.safe_load(registry_file.read_text())
    data["matrices"]["t"]["sources"] = ["original", f"loaded:{tmp_path / 'nowhere'}"]
    registry_file.write_text(yaml.safe_dump(data))
    with pytest.raises(RegistryError, match=r"matrices.t.sources\[1\]: cannot read the SAE: .*nowhere: no such file"):
        load_registry([registry_file], load_plugins(entry_points=False))


@pytest.mark.parametrize("compression", ["rtn-w8a8", "hqq-4bit", "gptq-w4g64"])
def test_quantized_models_rerun_from_cache_give_the_same_scores(tmp_path, registry_file, compression):
    """W8A8 keeps an activation-quantizing forward and HQQ replaces modules: neither may be rebuilt from a
    state dict alone; GPTQ's baked weights may. All must score the same after the cache is partly cleared."""
    from saex.cli import PROJECT_REGISTRY

    data = yaml.safe_load(registry_file.read_text())
    data.pop("compressions")
    data["matrices"]["t"].update(compressions=[compression], hooks=["layers.1.resid_post"], sources=["original"])
    registry_file.write_text(yaml.safe_dump(data))

    def run(store):
        plugins = load_plugins(entry_points=False)
        runner = Runner(
            plugins,
            load_registry([PROJECT_REGISTRY, registry_file], plugins),
            ResultsStore(store),
            Cache(tmp_path / "cache"),
            progress=False,
            log=lambda m: None,
        )
        return by_label(runner.run("t"))[("layers.1.resid_post", "original", compression)]

    first = run(tmp_path / "a.sqlite")
    for kind in ("activations", "lm"):
        shutil.rmtree(tmp_path / "cache" / kind)
    second = run(tmp_path / "b.sqlite")
    assert first.status == second.status == "done"
    assert second.metrics.keys() == first.metrics.keys()
    assert [k for k, v in first.metrics.items() if (v is None) != (second.metrics[k] is None)] == []
    finite = {k: v for k, v in first.metrics.items() if v is not None}
    assert {k: second.metrics[k] for k in finite} == pytest.approx(finite, rel=1e-6)
    assert second.details["compression"]["from_cache"] is (compression == "gptq-w4g64")


def test_model_loss_comes_from_the_clean_ce_kl_pass_when_it_covers_the_eval_split(tmp_path, registry_file, monkeypatch):
    """With CE/KL on every eval token the separate perplexity pass is never made, and the model loss equals the
    one that pass gives (CE/KL on half the tokens) to 1e-6, on M and on M_c."""
    import saex.run.artifacts

    separate_passes = []
    real = saex.run.artifacts.next_token_loss
    monkeypatch.setattr(
        saex.run.artifacts, "next_token_loss", lambda *a, **k: separate_passes.append(1) or real(*a, **k)
    )
    data = yaml.safe_load(registry_file.read_text())
    data["matrices"]["t"] |= {"hooks": ["layers.1.resid_post"], "compressions": ["mag"], "sources": ["original"]}
    losses = {}
    for tokens in (512, 1024):
        data["metrics"]["cekl"]["params"]["max_tokens"] = tokens
        (tmp_path / str(tokens)).mkdir()
        path = tmp_path / str(tokens) / "reg.yaml"
        path.write_text(yaml.safe_dump(data))
        separate_passes.clear()
        results = make_runner(tmp_path / str(tokens), path).run("t")
        assert [r.status for r in results] == ["done", "done"]
        losses[tokens] = {r.cell["compression"]: r.metrics for r in results}
        assert len(separate_passes) == (2 if tokens == 512 else 0)
    for compression, metrics in losses[1024].items():
        assert metrics["model_ce"] == metrics["ce_clean"]
        assert metrics["model_ce"] == pytest.approx(losses[512][compression]["model_ce"], abs=1e-6)
        assert metrics["model_ppl"] == pytest.approx(math.exp(metrics["model_ce"]), rel=1e-12)
