"""The ``precision`` of model passes: bfloat16 results within the tolerance docs/PERFORMANCE.md states, from the
same float32 compression, as results of their own; refused (exit 2) where the CPU has no bfloat16."""

import pytest
import torch
import yaml
from conftest import tiny3_matrix, tiny3_sections

from saex.cli import main
from saex.config.registry import load_registry
from saex.plugin.manager import load_plugins
from saex.report.markdown import markdown
from saex.run.outputs import declared_outputs
from saex.run.runner import Runner
from saex.storage.cache import Cache
from saex.storage.results import ResultsStore

BF16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
# docs/PERFORMANCE.md ("bfloat16 against float32"): relative on losses and explained variance, absolute on scores
REL_LOSS, REL_EV, ABS_KL_SCORE = 1e-3, 0.01, 0.005


def registry(tmp_path, text_corpus, precision: str):
    data = {
        **tiny3_sections(text_corpus, 4096),
        "metrics": {"rec": {"plugin": "reconstruction"}, "cekl": {"plugin": "ce_kl", "params": {"max_tokens": 1024}}},
        "matrices": {
            "t": tiny3_matrix(
                sources=["original", "retrained"],
                metrics=["rec", "cekl"],
                precision=precision,
                tokens={"train": 4096, "calibration": 512, "eval": 1024},
            )
        },
    }
    path = tmp_path / f"{precision}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.skipif(not BF16, reason="this CPU has no bfloat16 instructions (the refusal is tested below)")
def test_bfloat16_passes_stay_within_the_documented_tolerance_of_float32(tmp_path, text_corpus):
    plugins, cache, found = load_plugins(entry_points=False), Cache(tmp_path / "cache"), {}
    for precision in ("float32", "bfloat16"):
        reg = load_registry([registry(tmp_path, text_corpus, precision)], plugins)
        store = ResultsStore(tmp_path / f"{precision}.sqlite")
        runner = Runner(plugins, reg, store, cache, progress=False, log=lambda m: None)
        found[precision] = {(r.cell["source"], r.cell["compression"]): r for r in runner.run("t")}
    assert len(found["float32"]) == 3
    for cell, exact in found["float32"].items():
        bf16 = found["bfloat16"][cell]
        assert bf16.status == exact.status == "done" and bf16.key != exact.key  # results of their own
        if cell[1] is not None:  # the same float32 compression, cast afterwards
            assert bf16.details["compression"]["layers"] == exact.details["compression"]["layers"]
        a, b = exact.metrics, bf16.metrics
        for key in ("model_ce", "ce_clean", "ce_sae", "mse"):
            assert b[key] == pytest.approx(a[key], rel=REL_LOSS if key != "mse" else REL_EV), (cell, key)
        assert b["explained_variance"] == pytest.approx(a["explained_variance"], rel=REL_EV), cell
        for key in ("kl_div_score", "kl_div_score_mean"):
            assert b[key] == pytest.approx(a[key], abs=ABS_KL_SCORE), (cell, key)
        assert a["kl_sae"] != b["kl_sae"]  # the passes did run in bfloat16
    outputs = declared_outputs(plugins)
    assert "**bfloat16**: the model passes of 3 of 3 cells" in markdown("t", list(found["bfloat16"].values()), outputs)
    assert "bfloat16" not in markdown("t", list(found["float32"].values()), outputs)


def test_bfloat16_is_refused_with_exit_2_on_a_cpu_without_it(tmp_path, text_corpus, monkeypatch, capsys):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    monkeypatch.setenv("SAEX_HOME", str(tmp_path / "home"))
    path = registry(tmp_path, text_corpus, "bfloat16")
    assert main(["run", "t", "--registry", str(path), "--store", str(tmp_path / "s.sqlite"), "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert f"{path}: matrices.t.precision: 'bfloat16': this CPU has no bfloat16 instructions" in error
    assert "valid here: float32" in error and "Traceback" not in error
