"""`saex export` (saex.run.export): the SAE of every finished cell of a tiny matrix (original, retrained, pruned,
fine-tuned) written in SAELens's format loads with SAELens's own loader and gives the latents of the SAE the runner
finds in the cache; saex's own format round-trips bit for bit; and the refusals (a folder in the way, an unfinished
cell, an SAE no longer cached, an unknown or ambiguous cell) exit 2 with one line, computing nothing."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny3_matrix, tiny3_sections
from safetensors.torch import load_file

from saex.cli import PROJECT_REGISTRY, main
from saex.config.matrix import expand
from saex.config.registry import load_registry
from saex.plugin.manager import load_plugins
from saex.run.export import ReadOnlyCache, cell_sae, tl_hook
from saex.run.runner import Runner
from saex.sae.base import load_sae
from saex.storage.results import ResultsStore

sae_lens = pytest.importorskip("sae_lens")
from sae_lens import SAE as LensSAE  # noqa: E402

SOURCES = ["original", "retrained", "pruned:mag@0.5", "finetuned:1024"]
pytestmark = pytest.mark.usefixtures("single_thread_module")


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny matrix run once: its registry, store and saex home."""
    root = tmp_path_factory.mktemp("export")
    from saex.testing import doc_corpus

    corpus = doc_corpus(root / "corpus")
    data = {
        **tiny3_sections(corpus, 2048),
        "pruners": {"mag": {"plugin": "magnitude"}},
        "metrics": {"rec": {"plugin": "reconstruction"}},
        "matrices": {
            "t": tiny3_matrix(sources=SOURCES, metrics=["rec"], tokens={"train": 2048, "calibration": 512, "eval": 512})
        },
    }
    reg = root / "reg.yaml"
    reg.write_text(yaml.safe_dump(data))
    store = root / "r.sqlite"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAEX_HOME", str(root / "home"))
        assert main(["run", "t", "--registry", str(reg), "--store", str(store), "--no-progress"]) == 0
    return {"reg": reg, "store": store, "home": root / "home"}


@pytest.fixture(autouse=True)
def _home(ran: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAEX_HOME", str(ran["home"]))


def export(ran: dict, *args: str) -> int:
    return main(["export", "--registry", str(ran["reg"]), "--store", str(ran["store"]), *args])


def cached_sae(ran: dict, source: str):
    """The SAE the runner finds for the cell of ``source`` (on M_c), from the cache alone."""
    plugins = load_plugins()
    registry = load_registry([PROJECT_REGISTRY, ran["reg"]], plugins)
    (cell,) = [c for c in expand("t", registry.matrix("t")) if c.source == source and c.compression == "mag"]
    cache = ReadOnlyCache(ran["home"] / "cache")
    runner = Runner(plugins, registry, ResultsStore(Path(":memory:")), cache, progress=False, log=lambda m: None)
    return cell, cell_sae(runner, cell, torch.device("cpu"))


def cache_entries(home: Path) -> list[str]:
    """What the cache holds (lock files aside: reading takes locks too)."""
    return sorted(str(p.relative_to(home)) for p in (home / "cache").glob("*/*") if p.parent.name != "locks")


@pytest.mark.parametrize("source", SOURCES)
def test_saelens_export_loads_in_saelens_with_the_same_latents(ran, tmp_path, capsys, source):
    out = tmp_path / "sae"
    assert export(ran, "--matrix", "t", "--source", source, "--compression", "mag", "--out", str(out)) == 0
    assert capsys.readouterr().out == f"{out}\n"
    cell, artifact = cached_sae(ran, source)
    cfg = json.loads((out / "cfg.json").read_text())
    assert (cfg["metadata"]["hook_name"], cfg["metadata"]["model_name"]) == ("blocks.1.hook_resid_post", "tiny3")
    assert cfg["metadata"]["saex_cell"]["key"] == cell.key(
        load_registry([PROJECT_REGISTRY, ran["reg"]], load_plugins())
    )
    lens = LensSAE.load_from_disk(str(out), device="cpu")
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(0)) * 3
    with torch.no_grad():
        ours, theirs = artifact.sae.encode(x), lens.encode(x)
        assert torch.equal(ours != 0, theirs != 0)  # the same latents fire
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lens.decode(theirs), artifact.sae.decode(ours), rtol=1e-5, atol=1e-5)
    assert (ours != 0).sum(-1).max() <= 8  # TopK, k 8: a trained SAE, not an empty one


def test_saex_format_round_trips_bit_for_bit_by_key(ran, tmp_path, capsys):
    _, artifact = cached_sae(ran, "retrained")
    rows = [r for r in ResultsStore.existing(ran["store"]).rows("t") if r.cell["source"] == "retrained"]
    out = tmp_path / "mine"
    assert export(ran, "--key", rows[0].key[:8], "--format", "saex", "--out", str(out)) == 0
    assert capsys.readouterr().out == f"{out}\n"
    loaded = load_sae(out, _architectures())
    assert loaded.state_dict().keys() == artifact.sae.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in artifact.sae.state_dict().items())
    cached = ran["home"] / "cache" / "saes" / artifact.key / "sae_weights.safetensors"
    assert (out / "sae_weights.safetensors").read_bytes() == cached.read_bytes()  # the cached SAE itself
    assert load_file(str(out / "sae_weights.safetensors")).keys() == artifact.sae.state_dict().keys()


def _architectures() -> dict:
    plugins = load_plugins()
    return {name: plugins.get("sae", name) for name in plugins.names("sae")}


def test_an_existing_folder_is_refused_unless_forced(ran, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert export(ran, "--matrix", "t", "--source", "original", "--out", str(out)) == 2
    assert (
        capsys.readouterr().err
        == f"saex: error: {out}: already exists; pass --force to overwrite the SAE files in it\n"
    )
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert export(ran, "--matrix", "t", "--source", "original", "--out", str(out), "--force") == 0
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "notes.txt", "sae_weights.safetensors"]
    assert (out / "notes.txt").read_text() == "mine"
    file = tmp_path / "file"
    file.write_text("x")
    assert export(ran, "--matrix", "t", "--source", "original", "--out", str(file / "sae"), "--force") == 2
    assert capsys.readouterr().err.endswith(f"saex: error: {file}: is not a folder (on the way to {file / 'sae'})\n")


def test_cell_choice_refusals(ran, tmp_path, capsys):
    out = str(tmp_path / "x")
    assert export(ran, "--matrix", "t", "--out", out) == 2
    err = capsys.readouterr().err
    assert err.startswith("saex: error: 4 SAEs of matrix 't' match: tiny3 layers.1.resid_post small/original; ")
    assert err.endswith("narrow with --model --hook --sae --source --compression or name one with --key\n")
    assert export(ran, "--matrix", "t", "--source", "pruned:mag@0.9", "--out", out) == 2
    assert capsys.readouterr().err == "saex: error: matrix 't' has no cell with source=pruned:mag@0.9\n"
    assert export(ran, "--key", "0123456789", "--out", out) == 2
    assert capsys.readouterr().err == (
        f"saex: error: no cell with key '0123456789' in {ran['store']} (saex report MATRIX lists them)\n"
    )
    assert export(ran, "--out", out) == 2
    assert "name the cell: --key KEY" in capsys.readouterr().err
    assert not Path(out).exists()


def test_an_unfinished_cell_and_an_uncached_sae_exit_2_and_compute_nothing(ran, tmp_path, capsys):
    store = tmp_path / "r.sqlite"
    shutil.copy(ran["store"], store)
    rows = {r.cell["source"]: r for r in ResultsStore.existing(store).rows("t") if r.cell["compression"] == "mag"}
    with sqlite3.connect(store) as db:
        db.execute("UPDATE cells SET status = 'failed' WHERE key = ?", (rows["finetuned:1024"].key,))
    out = tmp_path / "sae"
    args = ["export", "--registry", str(ran["reg"]), "--store", str(store), "--out", str(out)]
    assert main([*args, "--matrix", "t", "--source", "finetuned:1024"]) == 2
    err = capsys.readouterr().err
    assert (
        err == "saex: error: cell tiny3 layers.1.resid_post small/finetuned:1024 on M_c[mag] is not finished (failed)\n"
    )
    assert main([*args, "--key", rows["finetuned:1024"].key]) == 2
    assert capsys.readouterr().err == f"saex: error: cell {rows['finetuned:1024'].key} is not finished (failed)\n"

    home = tmp_path / "home"  # a copy of the cache without the retrained SAE
    shutil.copytree(ran["home"], home)
    _, artifact = cached_sae(ran, "retrained")
    shutil.rmtree(home / "cache" / "saes" / artifact.key)
    before = cache_entries(home)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAEX_HOME", str(home))
        assert main([*args, "--key", rows["retrained"].key]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err == (
        f"saex: error: cell {rows['retrained'].key} (tiny3 layers.1.resid_post small/retrained on M_c[mag]) is "
        f"finished but its SAE is not in the cache {home / 'cache'} (saes/{artifact.key} is missing); nothing was "
        "computed"
    )
    assert cache_entries(home) == before and not out.exists()


def test_tl_hook_names():
    assert [tl_hook(f"layers.3.{site}") for site in ("resid_pre", "resid_post", "mlp_out", "attn_out")] == [
        "blocks.3.hook_resid_pre",
        "blocks.3.hook_resid_post",
        "blocks.3.hook_mlp_out",
        "blocks.3.hook_attn_out",
    ]
