"""``loaded:`` sources in a matrix: a bfloat16 SAELens SAE end to end on the tiny Llama (its retrained and pruned
cells derive from it), releases naming SAEs by id, and a hook or width that is not the SAE's refused with exit 2
before anything is computed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny3_matrix, tiny3_sections
from safetensors.torch import load_file, save_file

from saex.cli import PROJECT_REGISTRY, main
from saex.config.registry import load_registry
from saex.plugin.manager import load_plugins
from saex.storage.results import ResultsStore

sae_lens = pytest.importorskip("sae_lens")
from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig  # noqa: E402

D_MODEL, D_SAE = 64, 128  # the tiny Llama's hidden size


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAEX_HOME", str(tmp_path / "home"))


def saelens_sae(directory: Path, *, d_in: int = D_MODEL, hook: str = "blocks.1.hook_resid_post") -> Path:
    """A bfloat16 SAE written by SAELens itself, declaring the hook it was trained on."""
    lens = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=D_SAE, dtype="bfloat16"))
    lens.cfg.metadata.hook_name = hook
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in lens.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 if name.startswith("W") else 0.02))
    lens.save_model(directory)
    return directory


def sparsify_release(root: Path) -> Path:
    """A downloaded sparsify repo: one folder per hookpoint, two MLP outputs and one layer output."""
    for hookpoint in ("layers.0.mlp", "layers.1.mlp", "layers.1"):
        folder = root / hookpoint
        folder.mkdir(parents=True)
        g = torch.Generator().manual_seed(len(hookpoint))
        shapes = {"encoder.weight": (D_SAE, D_MODEL), "encoder.bias": (D_SAE,), "W_dec": (D_SAE, D_MODEL)}
        state = {k: torch.randn(shape, generator=g) * 0.1 for k, shape in (shapes | {"b_dec": (D_MODEL,)}).items()}
        save_file(state, str(folder / "sae.safetensors"))
        (folder / "cfg.json").write_text(json.dumps({"d_in": D_MODEL, "num_latents": D_SAE, "k": 8}))
    return root


def registry(tmp_path: Path, text_corpus: Path, sources: list[str], **extra: object) -> Path:
    data: dict = {
        **tiny3_sections(text_corpus, 2048),
        "pruners": {"mag": {"plugin": "magnitude"}},
        "metrics": {
            "rec": {"plugin": "reconstruction"},
            "tr": {"plugin": "transfer"},
            "cekl": {"plugin": "ce_kl", "params": {"max_tokens": 256}},
        },
        "matrices": {
            "t": tiny3_matrix(
                sources=sources,
                metrics=["rec", "tr", "cekl"],
                tokens={"train": 2048, "calibration": 512, "eval": 512},
            )
        },
    }
    for section, value in extra.items():
        if section == "matrix":
            data["matrices"]["t"].update(value)
        else:
            data[section] = value
    path = tmp_path / "reg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_bfloat16_saelens_sae_runs_end_to_end_and_its_retrained_is_its_architecture(tmp_path, text_corpus, capsys):
    path = saelens_sae(tmp_path / "lens")
    reg = registry(tmp_path, text_corpus, [f"loaded:{path}", "retrained", "pruned:mag@0.5"])
    store = tmp_path / "r.sqlite"
    assert main(["run", "t", "--registry", str(reg), "--store", str(store), "--no-progress"]) == 0
    capsys.readouterr()
    rows = {(r["source"], r["compression"]): r for r in _rows(store)}
    assert len(rows) == 4 and all(r["status"] == "done" for r in rows.values())
    on_m, on_mc = rows[(f"loaded:{path}", None)], rows[(f"loaded:{path}", "mag")]
    for row in (on_m, on_mc):
        assert row["details"]["loaded"] == {"format": "saelens", "path": str(path), "hook": "blocks.1.hook_resid_post"}
        assert math.isfinite(row["metrics"]["explained_variance"]) and math.isfinite(row["metrics"]["kl_sae"])
        assert 0 < row["metrics"]["l0"] < D_SAE
    assert on_m["metrics"]["l0"] != on_mc["metrics"]["l0"]  # the same SAE on two models' activations
    like = rows[("retrained", "mag")]["details"]["retrained_like"]
    assert like == {"architecture": "relu", "d_sae": D_SAE, "source": f"loaded:{path}"}  # not the `small` topk
    assert math.isfinite(rows[("retrained", "mag")]["metrics"]["dec_match_mean_max_cos"])  # against the loaded SAE
    assert rows[("pruned:mag@0.5", "mag")]["details"]["pruning"]["achieved"]["sparsity"] == pytest.approx(0.5)
    # named by its own identity (format and folder name), and so are the SAEs derived from it, never `small`
    assert {r["details"].get("sae_label") for r in rows.values()} == {"saelens:lens"}


def test_a_loaded_sae_is_named_by_its_identity_in_report_and_site(tmp_path, text_corpus, capsys):
    path = saelens_sae(tmp_path / "lens")
    reg = registry(tmp_path, text_corpus, ["original", f"loaded:{path}", "pruned:mag@0.5"])
    store = tmp_path / "r.sqlite"
    assert main(["run", "t", "--registry", str(reg), "--store", str(store), "--no-progress"]) == 0
    summary = capsys.readouterr().out
    titles = [line for line in summary.splitlines() if line.startswith("layers.1.resid_post · ")]
    assert titles == [
        "layers.1.resid_post · SAE small · M_c = mag",
        "layers.1.resid_post · SAE saelens:lens · M_c = mag",
    ]
    block = summary[summary.index(titles[1]) :].splitlines()[1:6]
    assert [line.split()[1:3] for line in block if not line.startswith(" ")] == [
        ["source", "scored"],
        ["loaded", "M"],
        ["loaded", "M_c"],
        ["pruned:mag@0.5", "M_c"],
    ]
    assert "  Δ vs loaded  " in summary  # the pruned SAE against the loaded one it was pruned from

    assert main(["report", "t", "--registry", str(reg), "--store", str(store), "--full"]) == 0
    full = capsys.readouterr().out
    every = full[full.index("### Every cell") :]
    assert every.count("| saelens:lens |") == 3 and every.count("| small |") == 2
    assert "| small | loaded:" not in full and "| small | pruned:" not in full
    out = tmp_path / "site"
    assert main(["report", "t", "--registry", str(reg), "--store", str(store), "--out", str(out)]) == 0
    capsys.readouterr()
    assert "saelens:lens" in (out / "index.html").read_text() and "saelens:lens" in (out / "report.md").read_text()

    exported = tmp_path / "exported"  # taken out again: SAELens reads the same SAE, its label recorded
    args = ["export", "--registry", str(reg), "--store", str(store), "--matrix", "t", "--out", str(exported)]
    assert main([*args, "--source", f"loaded:{path}"]) == 0
    assert capsys.readouterr().out == f"{exported}\n"
    meta = json.loads((exported / "cfg.json").read_text())["metadata"]
    assert (meta["hook_name"], meta["saex_cell"]["sae_label"]) == ("blocks.1.hook_resid_post", "saelens:lens")
    x = torch.randn(64, D_MODEL, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = sae_lens.SAE.load_from_disk(str(path), device="cpu").encode(x)
        assert torch.equal(sae_lens.SAE.load_from_disk(str(exported), device="cpu").encode(x), theirs)


def test_labels_of_loaded_saes():
    from saex.config.pretrained import loaded_label
    from saex.report.cells import sae_label
    from saex.storage.results import CellResult

    assert loaded_label("gemmascope", "/x/layer_12/width_16k/average_l0_82/params.npz") == (
        "gemmascope:average_l0_82/params.npz"
    )
    assert loaded_label("openai", "/x/v5_32k/autoencoders/5.pt") == "openai:autoencoders/5.pt"
    assert loaded_label("saelens", "/x/my-sae") == "saelens:my-sae"
    assert loaded_label("sparsify", "/x/sae-llama/layers.10.mlp", "eleuther/L10-mlp") == "sparsify:eleuther/L10-mlp"
    cell = {"model": "m", "hook": "layers.1.resid_post", "sae": "small", "source": "retrained"}
    old = {"resolved": {"loaded": {"format": "saelens", "path": "/x/lens", "files": "0f"}}}  # no label stored
    assert sae_label(CellResult("k", "t", cell, "done", config=old)) == "saelens:lens"
    assert sae_label(CellResult("k", "t", cell, "done", details={"sae_label": "gemmascope:gs/L1"}, config=old)) == (
        "gemmascope:gs/L1"
    )
    assert sae_label(CellResult("k", "t", cell, "done", config={"resolved": {}})) == "small"


def _rows(store: Path) -> list[dict]:
    return [
        {"status": r.status, "details": r.details, "metrics": r.metrics, **r.cell}
        for r in ResultsStore.existing(store).rows("t")
    ]


def test_a_release_names_its_saes_by_id(tmp_path, text_corpus, capsys):
    root = sparsify_release(tmp_path / "downloads" / "sae-tiny")
    release = {
        "eleuther": {
            "path": str(root.relative_to(tmp_path)),  # relative to the registry file's folder
            "format": "sparsify",
            "saes": {
                "L0-mlp": {"path": "layers.0.mlp", "hook": "layers.0.mlp_out"},  # a Llama's MLP output
                "L1-mlp": {"path": "layers.1.mlp"},
                "L1": {"path": "layers.1"},
            },
        }
    }
    at_mlp = {"hooks": ["layers.0.mlp_out"]}
    for source, matrix in (("loaded:eleuther/L0-mlp", at_mlp), ("loaded:eleuther/L1", {})):
        reg = registry(tmp_path, text_corpus, [source], releases=release, matrix=matrix)
        assert main(["validate", "t", "--registry", str(reg)]) == 0
    capsys.readouterr()
    registry_read = load_registry([PROJECT_REGISTRY, reg], load_plugins())
    assert registry_read.loaded_sae("t", "loaded:eleuther/L1").label == "sparsify:eleuther/L1"  # release/id
    reg = registry(tmp_path, text_corpus, ["loaded:eleuther/L2"], releases=release)
    assert main(["validate", "t", "--registry", str(reg)]) == 2
    err = capsys.readouterr().err
    assert "matrices.t.sources[0]: release 'eleuther' has no SAE of that id (got 'L2'); valid choices: L0-mlp" in err
    reg = registry(tmp_path, text_corpus, ["loaded:eleuther/L1-mlp"], releases=release)  # no `hook:`
    assert main(["validate", "t", "--registry", str(reg)]) == 2
    assert "trained on 'layers.1.mlp', which is no saex hook point" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        ({"format": "npz"}, "releases.gs.format: Value error, unknown SAE format 'npz'; valid: saex, saelens"),
        ({"path": "nowhere"}, "releases.gs.saes.L0: cannot read the SAE: "),
        ({"saes": {}}, "releases.gs.saes: Dictionary should have at least 1 item"),
        ({"saes": {"L0": {"path": "sae", "hook": "layers.1.mlp_out"}}}, "releases.gs.saes.L0.hook: contradicts"),
    ],
)
def test_bad_release_is_exit_2_with_its_place(tmp_path, text_corpus, capsys, edit, expected):
    saelens_sae(tmp_path / "rel" / "sae")
    release = {"gs": {"path": "rel", "saes": {"L0": {"path": "sae"}}} | edit}
    reg = registry(tmp_path, text_corpus, ["loaded:gs/L0"], releases=release)
    assert main(["validate", "t", "--registry", str(reg)]) == 2
    assert expected in capsys.readouterr().err


def test_hook_the_sae_was_not_trained_on_is_exit_2_before_anything_runs(tmp_path, text_corpus, capsys):
    path = saelens_sae(tmp_path / "lens")
    reg = registry(tmp_path, text_corpus, [f"loaded:{path}"], matrix={"hooks": ["layers.0.mlp_out"]})
    store = tmp_path / "r.sqlite"
    for command in (["validate", "t"], ["run", "t", "--store", str(store)]):
        assert main([*command, "--registry", str(reg)]) == 2
        err = capsys.readouterr().err
        expected = "matrices.t.hooks[0]: loaded:"
        assert expected in err and "was trained on blocks.1.hook_resid_post (layers.1.resid_post)" in err
        assert "(got 'layers.0.mlp_out'); valid choices: layers.1.resid_post" in err
    assert not store.exists()


def test_width_that_is_not_the_models_is_exit_2_before_anything_runs(tmp_path, text_corpus, capsys):
    path = saelens_sae(tmp_path / "lens", d_in=32)
    reg = registry(tmp_path, text_corpus, [f"loaded:{path}"])
    assert main(["validate", "t", "--registry", str(reg)]) == 0  # the width is known once the model is built
    capsys.readouterr()
    assert main(["run", "t", "--registry", str(reg), "--store", str(tmp_path / "r.sqlite")]) == 2
    err = capsys.readouterr().err
    assert "matrices.t.sources[0]: loaded:" in err and "reads 32-wide activations; model 'tiny3' has 64" in err
    assert not (tmp_path / "home" / "cache" / "acts").exists()


def test_retrained_with_two_loaded_sources_is_ambiguous(tmp_path, text_corpus, capsys):
    first, second = saelens_sae(tmp_path / "a"), saelens_sae(tmp_path / "b")
    reg = registry(tmp_path, text_corpus, [f"loaded:{first}", f"loaded:{second}", "retrained"])
    assert main(["validate", "t", "--registry", str(reg)]) == 2
    assert "retrained derives from the matrix's loaded: SAE, and it has 2: one per matrix" in capsys.readouterr().err


def test_format_named_in_the_source_must_match_the_files(tmp_path, text_corpus, capsys):
    path = saelens_sae(tmp_path / "lens")
    reg = registry(tmp_path, text_corpus, [f"loaded:sparsify:{path}"])
    assert main(["validate", "t", "--registry", str(reg)]) == 2
    err = capsys.readouterr().err
    assert "cannot read the SAE" in err and json.dumps(str(path))[1:-1] in err


def test_openai_topk_sae_is_retrained_with_its_k_width_and_layer_norm(tmp_path, text_corpus, capsys):
    """OpenAI's v5 layout: TopK with a per-token layer norm. Its retrained SAE keeps what the file fixes (width,
    k, the norm: trained on layer-normed activations) and takes the rest from the matrix's topk entry."""
    g = torch.Generator().manual_seed(0)
    state = {
        "pre_bias": torch.randn(D_MODEL, generator=g) * 0.1,
        "encoder.weight": torch.randn(D_SAE, D_MODEL, generator=g) * 0.1,
        "latent_bias": torch.zeros(D_SAE),
        "decoder.weight": torch.randn(D_MODEL, D_SAE, generator=g) * 0.1,
        "activation": "TopK",
        "activation_state_dict": {"k": 4, "postact_fn": "ReLU"},
    }
    path = tmp_path / "resid_post_mlp_v5_32k" / "autoencoders" / "1.pt"
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    saes = {
        "small": {
            "plugin": "topk",
            "params": {"expansion_factor": 2, "k": 8, "aux_coefficient": 0.25},
            "training": {"tokens": 2048, "batch_size": 256, "lr": 0.003},
        }
    }
    reg = registry(tmp_path, text_corpus, [f"loaded:{path}", "retrained"], saes=saes)
    store = tmp_path / "r.sqlite"
    assert main(["run", "t", "--registry", str(reg), "--store", str(store), "--no-progress"]) == 0
    capsys.readouterr()
    rows = {(r["source"], r["compression"]): r for r in _rows(store)}
    assert all(r["status"] == "done" for r in rows.values()) and len(rows) == 3
    assert rows[(f"loaded:{path}", None)]["metrics"]["l0"] <= 4
    assert rows[("retrained", "mag")]["details"]["retrained_like"]["architecture"] == "topk"
    assert rows[("retrained", "mag")]["details"]["sae_label"] == "openai:autoencoders/1.pt"
    (saved,) = [p.parent for p in (tmp_path / "home").rglob("cfg.json")]  # the retrained SAE: nothing else is
    retrained = json.loads((saved / "cfg.json").read_text())
    assert (retrained["architecture"], retrained["d_sae"], retrained["params"]["k"]) == ("topk", D_SAE, 4)
    assert retrained["params"]["aux_coefficient"] == 0.25  # from the entry: the file does not fix it
    assert bool(load_file(str(saved / "sae_weights.safetensors"))["layer_norm"])


def test_a_feature_browser_is_titled_by_the_loaded_saes_label():
    from saex.report.browser import Scope

    scope = Scope("m", "layers.1.resid_post", "small", "mag", "saelens:lens")
    assert scope.title == "layers.1.resid_post · SAE saelens:lens · M vs M_c (mag) · m"
    assert scope == Scope("m", "layers.1.resid_post", "small", "mag")  # the label names it; the fields identify it
    assert Scope("m", "layers.1.resid_post", "small", "mag").title.startswith("layers.1.resid_post · SAE small ·")
