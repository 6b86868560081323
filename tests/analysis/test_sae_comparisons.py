"""SAEs set against each other, end to end on a tiny random Llama: seeded sources (the noise floor), the fine-tune
arm, a sparsity sweep, per-latent survival stored with the cell, and the report's alignment table, matched-L0
check and figures."""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch
import yaml

from saex.analysis.latent_store import load_per_latent
from saex.analysis.survival import Survival
from saex.config.matrix import expand
from saex.config.registry import load_registry
from saex.config.registry_file import RegistryError
from saex.config.sources import Source, parse_source
from saex.model.hookpoints import parse_hook
from saex.plugin.manager import load_plugins
from saex.report.comparisons import sparsity_warnings
from saex.report.markdown import Section, markdown, write_report
from saex.run.outputs import declared_outputs
from saex.run.runner import Runner
from saex.storage.cache import Cache
from saex.storage.results import CellResult, ResultsStore

pytestmark = pytest.mark.usefixtures("single_thread_module")

SOURCES = ["original", "original@seed=1", "retrained", "retrained@seed=1", "finetuned:0", "finetuned:512"]
HOOK = "layers.1.resid_post"
DOCUMENTS = (
    "json os re collections itertools typing inspect argparse subprocess string random statistics heapq tempfile "
    "fnmatch csv pickle copy pprint time hashlib struct unittest doctest pdb optparse cmd difflib locale tokenize"
)


def registry_data(corpus: str) -> dict:
    return {
        "models": {"tiny2": {"plugin": "tiny-llama", "params": {"num_hidden_layers": 2}}},
        "corpora": {"docs": {"plugin": "files", "params": {"paths": [corpus]}}},
        "compressions": {"mag": {"plugin": "magnitude", "params": {"sparsity": 0.5}}},
        "saes": {
            "small": {
                "plugin": "topk",
                "params": {"expansion_factor": 2},
                "training": {"tokens": 1024, "batch_size": 128, "lr": 0.003},
                "sweep": {"k": [4, 8]},
            }
        },
        "metrics": {"rec": {"plugin": "reconstruction"}, "tr": {"plugin": "transfer"}},
        "matrices": {
            "t": {
                "models": ["tiny2"],
                "corpus": "docs",
                "compressions": ["mag"],
                "hooks": [HOOK],
                "saes": ["small"],
                "sources": SOURCES,
                "metrics": ["rec", "tr"],
                "block_size": 32,
                "device": "cpu",
                "tokens": {"train": 1024, "calibration": 64, "eval": 512},
            }
        },
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("comparisons")
    for name in DOCUMENTS.split():  # documents fall into splits by hash: enough of them to fill each
        (root / f"{name}.txt").write_text(inspect.getdoc(importlib.import_module(name)) or "")
    path = root / "reg.yaml"
    path.write_text(yaml.safe_dump(registry_data(str(root / "*.txt"))))
    plugins = load_plugins(entry_points=False)
    registry = load_registry([path], plugins)
    runner = Runner(
        plugins, registry, ResultsStore(root / "r.sqlite"), Cache(root / "cache"), progress=False, log=lambda m: None
    )
    results = runner.run("t")
    return runner, {(r.cell["sae"], r.cell["source"], r.cell["compression"]): r for r in results}, root


def test_every_cell_runs_and_the_sweep_gives_an_entry_per_k(run):
    runner, cells, _ = run
    assert len(cells) == 2 * (2 + len(SOURCES)) and all(r.status == "done" for r in cells.values())
    for k in (4, 8):
        assert cells[(f"small@k={k}", "original", None)].metrics["l0"] == pytest.approx(k, abs=0.5)
        assert runner.registry.component("saes", f"small@k={k}").params.k == k


def test_seeded_sources_have_their_own_keys_and_sae(run):
    runner, cells, _ = run
    keys = {c.key(runner.registry) for c in expand("t", runner.registry.matrix("t"))}
    assert len(keys) == len(cells)
    session = runner.open_model("t", "tiny2", torch.device("cpu"))
    sae, hook = runner.registry.component("saes", "small@k=4"), parse_hook(HOOK)
    original = session.artifacts.saes.sae(parse_source("original"), sae, session.artifacts.base, hook)
    seeded = session.artifacts.saes.sae(parse_source("original@seed=1"), sae, session.artifacts.base, hook)
    assert seeded.key != original.key and not torch.equal(seeded.sae.W_dec, original.sae.W_dec)
    floor = cells[("small@k=4", "original@seed=1", None)].metrics
    assert 0 < floor["align_dec_mean_cos"] < 0.99  # two seeds share only part of their directions
    assert floor["align_dec_mean_cos"] <= floor["dec_match_mean_max_cos"]  # one-to-one never beats the best match
    retrained = cells[("small@k=4", "retrained", "mag")].metrics["align_dec_mean_cos"]
    assert retrained != cells[("small@k=4", "retrained@seed=1", "mag")].metrics["align_dec_mean_cos"]


def test_finetuned_zero_is_the_original_bit_for_bit_and_more_tokens_move_it(run):
    runner, cells, _ = run
    session = runner.open_model("t", "tiny2", torch.device("cpu"))
    sae, hook = runner.registry.component("saes", "small@k=4"), parse_hook(HOOK)
    on_mag = next(c for c in expand("t", runner.registry.matrix("t")) if c.compression == "mag")
    target = session.target(on_mag, runner.registry)
    original = session.artifacts.saes.sae(parse_source("original"), sae, session.artifacts.base, hook)
    zero = session.artifacts.saes.sae(parse_source("finetuned:0"), sae, target, hook)
    tuned = session.artifacts.saes.sae(parse_source("finetuned:512"), sae, target, hook)
    for name, tensor in original.sae.state_dict().items():
        assert torch.equal(zero.sae.state_dict()[name], tensor), name
    assert not torch.equal(tuned.sae.W_dec, original.sae.W_dec)
    assert torch.equal(tuned.sae.norm_scale, original.sae.norm_scale)  # no data-dependent re-initialisation
    on_mc = cells[("small@k=4", "original", "mag")]
    zero_cell, tuned_cell = cells[("small@k=4", "finetuned:0", "mag")], cells[("small@k=4", "finetuned:512", "mag")]
    assert all(zero_cell.metrics[k] == v for k, v in on_mc.metrics.items())
    assert zero_cell.metrics["align_dec_mean_cos"] == pytest.approx(1, abs=1e-6)
    assert zero_cell.cost["sae_seconds"] == 0 and zero_cell.cost["sae_tokens"] == 0
    assert tuned_cell.cost["sae_tokens"] == 512 and tuned_cell.cost["original_sae_tokens"] == 1024
    assert tuned_cell.cost["original_sae_seconds"] == cells[("small@k=4", "original", None)].cost["sae_seconds"]
    assert tuned_cell.metrics["explained_variance"] > on_mc.metrics["explained_variance"]


def test_per_latent_survival_is_stored_with_the_cell_and_summarised(run):
    runner, cells, _ = run
    cell = cells[("small@k=4", "original", "mag")]
    latents = load_per_latent(runner.cache, cell.details)
    assert cell.details["per_latent"]["tensors"] == sorted(latents)
    classes, density = latents["survival_class"], latents["density_m"]
    assert len(classes) == 128 and classes.dtype == torch.int8
    fired = int((density > 0).sum())
    assert cell.metrics["survival_intact"] == pytest.approx(int((classes == Survival.INTACT).sum()) / fired)
    profile = cell.details["survival_by_frequency"]["bins"]
    assert sum(b["latents"] for b in profile) == fired
    assert "per_latent" not in cells[("small@k=4", "original", None)].details  # nothing to compare on M alone


def test_report_prints_alignment_beside_the_seed_floor_and_checks_l0(run, tmp_path):
    runner, cells, _ = run
    results, outputs = list(cells.values()), declared_outputs(runner.plugins)
    text = markdown("t", results, outputs)
    assert "### Alignment with the original, beside the seed noise floor" in text
    assert text.count("seed floor: original@seed=1") == 2  # one block per sweep member
    assert "### Matched sparsity" in text
    assert "All 14 SAEs are within 1.25x of their original's l0." in sparsity_warnings(results, outputs)
    names = {p.name.split("-")[0] for p in write_report(tmp_path / "fig", [Section("t", results)], outputs)}
    assert {"survival", "finetune", "l0"} <= names


def test_a_sweep_must_name_one_param_with_distinct_values(tmp_path):
    plugins = load_plugins(entry_points=False)
    for sweep, message in (({"k": [4, 4]}, "distinct"), ({"k": [4], "aux_k": [2]}, "exactly one param")):
        data = {"saes": {"s": {"plugin": "topk", "params": {}, "sweep": sweep}}}
        path = tmp_path / "reg.yaml"
        path.write_text(yaml.safe_dump(data))
        with pytest.raises(RegistryError, match=message):
            load_registry([path], plugins)


def test_a_seed_on_what_derives_from_a_loaded_sae_is_refused(tmp_path):
    data = registry_data(str(tmp_path / "*.txt"))
    data["matrices"]["t"]["sources"] = ["loaded:/nowhere", "finetuned:10@seed=1"]
    path = tmp_path / "reg.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(RegistryError, match="drop @seed"):
        load_registry([path], load_plugins(entry_points=False))


def test_sae_compared_at_another_l0_is_warned_about():
    outputs = declared_outputs(load_plugins(entry_points=False))

    def cell(source: str, compression: str | None, l0: float) -> CellResult:
        where = {"model": "m", "hook": "h", "sae": "s", "source": source, "compression": compression}
        return CellResult(
            source, "t", where | {"scored_on": "base" if compression is None else "compressed"}, "done", {"l0": l0}
        )

    results = [cell("original", None, 32), cell("original", "c", 36), cell("retrained", "c", 1200)]
    lines = sparsity_warnings(results, outputs)
    assert [line for line in lines if "⚠" in line] == [
        "- ⚠ h · s/retrained on M_c (c): l0 1200 against 32 for `original` on M (37.50x)"
    ]


def test_source_grammar_reads_budgets_and_seeds():
    assert parse_source("finetuned:30000") == Source("finetuned", tokens=30000)
    assert parse_source("retrained@seed=1") == Source("retrained", seed=1)
    assert parse_source("pruned:wanda@0.5@seed=2") == Source("pruned", pruner="wanda", sparsity=0.5, seed=2)
    assert parse_source("original@seed=1").seed_floor and not parse_source("original").seed_floor
    assert parse_source("original").is_original and not parse_source("finetuned:0").is_original
    assert parse_source("loaded:/x@seed=1").path == "/x@seed=1"  # a path is a path
    for bad in ("finetuned:", "finetuned:-1", "original@seed=", "retrained@seed=x"):
        with pytest.raises(ValueError, match="unknown SAE source"):
            parse_source(bad)
