"""A tiny matrix end to end on every supported layout (model plugin ``tiny``): M and a magnitude-pruned M_c,
an original and a retrained SAE, reconstruction and CE/KL. The spliced clean pass must give the model's own
loss, and the stored per-layer report must cover every block weight. An unsupported model is a registry error
(exit 2) naming its class before anything is computed."""

from __future__ import annotations

import pytest
import yaml

from saex.cli import main
from saex.config.registry import load_registry
from saex.plugin.manager import load_plugins
from saex.plugins.models.tiny import Architecture
from saex.run.runner import Runner
from saex.storage.cache import Cache
from saex.storage.results import ResultsStore

pytestmark = pytest.mark.usefixtures("single_thread")

ARCHITECTURES: tuple[str, ...] = Architecture.__args__


def registry(tmp_path, text_corpus, model: dict, hook: str) -> dict:
    return {
        "models": {"m": model},
        "corpora": {"docs": {"plugin": "files", "params": {"paths": [str(text_corpus / "*.txt")]}}},
        "compressions": {"mag": {"plugin": "magnitude", "params": {"sparsity": 0.5}}},
        "saes": {
            "small": {
                "plugin": "topk",
                "params": {"expansion_factor": 2, "k": 4},
                "training": {"tokens": 1024, "batch_size": 256, "lr": 0.003},
            }
        },
        "metrics": {"rec": {"plugin": "reconstruction"}, "cekl": {"plugin": "ce_kl", "params": {"max_tokens": 512}}},
        "matrices": {
            "t": {
                "models": ["m"],
                "corpus": "docs",
                "compressions": ["mag"],
                "hooks": [hook],
                "saes": ["small"],
                "metrics": ["rec", "cekl"],
                "block_size": 32,
                "device": "cpu",
                "tokens": {"train": 1024, "calibration": 64, "eval": 512},
            }
        },
    }


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_tiny_matrix_runs_on_every_layout(architecture, tmp_path, text_corpus) -> None:
    hook = f"layers.1.{('resid_post', 'mlp_out', 'attn_out', 'resid_pre')[ARCHITECTURES.index(architecture) % 4]}"
    model = {"plugin": "tiny", "params": {"architecture": architecture, "num_hidden_layers": 2}}
    path = tmp_path / "reg.yaml"
    path.write_text(yaml.safe_dump(registry(tmp_path, text_corpus, model, hook)))
    plugins = load_plugins(entry_points=False)
    store = ResultsStore(tmp_path / "results.sqlite")
    runner = Runner(
        plugins, load_registry([path], plugins), store, Cache(tmp_path / "cache"), progress=False, log=lambda m: None
    )
    results = {(r.cell["source"], r.cell["compression"]): r for r in runner.run("t")}
    assert set(results) == {("original", None), ("original", "mag"), ("retrained", "mag")}
    for cell, result in results.items():
        assert result.status == "done", (cell, result.error)
        metrics = result.metrics
        # 512 eval tokens, all of them spliced: the clean suffix pass is the model's own forward
        assert metrics["ce_clean"] == pytest.approx(metrics["model_ce"], rel=1e-5), cell
        assert 0 < metrics["l0"] <= 4 and metrics["kl_sae"] >= 0
    on_m, pruned = results[("original", None)].metrics, results[("original", "mag")]
    assert pruned.metrics["model_ce"] != on_m["model_ce"]
    layers = pruned.details["compression"]["layers"]
    assert len(layers) >= 8 and sum(layer["sparsity"] == 0.5 for layer in layers) >= len(layers) - 2  # MoE routers


def test_unsupported_model_is_a_registry_error_naming_its_class(tmp_path, text_corpus, monkeypatch, capsys) -> None:
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    from saex.plugins.models.tiny_llama import byte_tokenizer

    directory = tmp_path / "gpt-neo"
    config = GPTNeoConfig(vocab_size=259, hidden_size=16, num_layers=2, num_heads=2, attention_types=[[["global"], 2]])
    GPTNeoForCausalLM(config).save_pretrained(directory)
    byte_tokenizer().save_pretrained(directory)
    data = registry(tmp_path, text_corpus, {"plugin": "hf", "params": {"path": str(directory)}}, "layers.0.mlp_out")
    path = tmp_path / "reg.yaml"
    path.write_text(yaml.safe_dump(data))
    monkeypatch.setenv("SAEX_HOME", str(tmp_path / "home"))
    args = ["run", "t", "--registry", str(path), "--store", str(tmp_path / "r.sqlite"), "--no-progress"]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert "matrices.t.hooks[0]: model 'm': GPTNeoForCausalLM (model_type 'gpt_neo') has no hook layout" in error
    computed = [p for p in (tmp_path / "home").rglob("*") if p.is_file() and "fingerprints" not in p.parts]
    assert not computed  # no tokens, activations or SAEs (the model folder's fingerprint is remembered)
