"""The paper-small experiment end to end on a tiny random Llama: the project's own compressions (magnitude,
llm-compressor's Wanda and GPTQ), the SAE sources of the paper, every metric, and the report."""

import pytest
import yaml

from saex.cli import PROJECT_REGISTRY, main
from saex.config.registry import load_registry
from saex.plugin.manager import load_plugins
from saex.run.runner import Runner
from saex.storage.cache import Cache
from saex.storage.results import ResultsStore

SOURCES = [
    "original",
    "retrained",
    "pruned:wanda@0.25",
    "pruned:wanda@0.5",
    "pruned:wanda@0.75",
    "pruned:magnitude@0.5",
    "pruned:latents@0.5",
    "original@seed=1",
    "finetuned:10000",
    "finetuned:30000",
    "finetuned:100000",
]


@pytest.fixture
def paper_tiny(tmp_path, text_corpus):
    project = load_registry([PROJECT_REGISTRY], load_plugins(entry_points=False)).matrix("paper-small")
    data = {
        "models": {"tiny-paper": {"plugin": "tiny-llama", "params": {"num_hidden_layers": 3}}},
        "corpora": {"docs-paper": {"plugin": "files", "params": {"paths": [str(text_corpus / "*.txt")]}}},
        "saes": {
            "topk-paper-tiny": {
                "plugin": "topk",
                "params": {"expansion_factor": 2, "k": 8},
                "training": {"tokens": 4096, "batch_size": 256, "lr": 0.003},
            }
        },
        "matrices": {
            "paper-small-tiny": {
                "models": ["tiny-paper"],
                "corpus": "docs-paper",
                "compressions": project.compressions,
                "hooks": ["layers.1.resid_post"],
                "saes": ["topk-paper-tiny"],
                "sources": project.sources,
                "metrics": ["reconstruction", "transfer", "ce-kl-small"],
                "block_size": 64,
                "device": "cpu",
                "tokens": {"train": 4096, "calibration": 512, "eval": 1024},
            }
        },
    }
    path = tmp_path / "paper-tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_paper_small_sources_are_the_papers():
    project = load_registry([PROJECT_REGISTRY], load_plugins(entry_points=False)).matrix("paper-small")
    assert project.sources == SOURCES and len(project.compressions) == 3 and len(project.hooks) == 1


def test_paper_small_end_to_end_on_a_tiny_model(tmp_path, paper_tiny, monkeypatch, capsys):
    plugins = load_plugins(entry_points=False)
    registry = load_registry([PROJECT_REGISTRY, paper_tiny], plugins)
    runner = Runner(
        plugins,
        registry,
        ResultsStore(tmp_path / "r.sqlite"),
        Cache(tmp_path / "cache"),
        progress=False,
        log=lambda m: None,
    )
    results = runner.run("paper-small-tiny")
    compressions = registry.matrix("paper-small-tiny").compressions
    assert len(results) == 2 + len(compressions) * len(SOURCES)  # original and original@seed=1 on M too
    failed = [(r.cell, r.error) for r in results if r.status != "done"]
    assert not failed
    for compression in compressions:
        rows = [r for r in results if r.cell["compression"] == compression]
        assert len({r.metrics["ce_clean"] for r in rows}) == 1  # one clean run of M_c for every SAE
        assert len({r.metrics["model_ppl"] for r in rows}) == 1
        by_source = {r.cell["source"]: r for r in rows}
        for s in (0.25, 0.5, 0.75):
            achieved = by_source[f"pruned:wanda@{s}"].details["pruning"]["achieved"]
            assert achieved["sparsity_W_enc"] == pytest.approx(s, abs=0.02)
        assert by_source["pruned:latents@0.5"].details["pruning"]["achieved"]["d_sae"] == 64
        assert by_source["pruned:wanda@0.5"].cost["prune_seconds"] < by_source["retrained"].cost["sae_seconds"]
    monkeypatch.setenv("SAEX_HOME", str(tmp_path / "home"))
    out = tmp_path / "report"
    assert (
        main(
            [
                "report",
                "paper-small-tiny",
                "--registry",
                str(paper_tiny),
                "--store",
                str(tmp_path / "r.sqlite"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert any(p.startswith("sparsity-") for p in pngs) and any(p.startswith("transfer") for p in pngs)
    assert (out / "report.md").read_text().count("pruned:wanda@0.5") >= len(compressions)
