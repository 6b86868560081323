"""Registry errors name the file, the YAML path, the bad value and the valid choices; `saex validate` exits 2."""

from pathlib import Path

import pytest
import yaml

from saex.cli import main
from saex.config.registry import RegistryError, load_registry
from saex.plugin.manager import load_plugins

BASE = {
    "models": {"tiny": {"plugin": "tiny-llama"}},
    "corpora": {"text": {"plugin": "files", "params": {"paths": ["/nonexistent/*.txt"]}}},
    "compressions": {"mag": {"plugin": "magnitude", "params": {"sparsity": 0.5}}},
    "saes": {"topk": {"plugin": "topk", "params": {"k": 4}}},
    "metrics": {"rec": {"plugin": "reconstruction"}},
    "matrices": {
        "m": {
            "models": ["tiny"],
            "corpus": "text",
            "compressions": ["mag"],
            "hooks": ["layers.1.resid_post"],
            "saes": ["topk"],
            "metrics": ["rec"],
        }
    },
}


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def load(tmp_path: Path, data: dict) -> tuple[Path, object]:
    file = write(tmp_path / "reg.yaml", data)
    return file, load_registry([file], load_plugins(entry_points=False))


def error(tmp_path: Path, data: dict) -> RegistryError:
    with pytest.raises(RegistryError) as info:
        load(tmp_path, data)
    assert str(tmp_path / "reg.yaml") in str(info.value)
    return info.value


def mutate(section: str, name: str, **changes) -> dict:
    data = yaml.safe_load(yaml.safe_dump(BASE))
    data[section][name].update(changes)
    return data


def test_valid_registry_loads_and_resolves_params(tmp_path):
    _, reg = load(tmp_path, BASE)
    resolved = reg.component("compressions", "mag")
    assert resolved.params.sparsity == 0.5 and resolved.component.name == "magnitude"
    assert resolved.identity()["params"]["sparsity"] == 0.5 and "description" not in resolved.identity()
    assert reg.matrix("m").sources == ["original", "retrained"]


def test_unknown_plugin_lists_choices(tmp_path):
    err = error(tmp_path, mutate("compressions", "mag", plugin="wandaa"))
    assert err.path == "compressions.mag.plugin" and err.value == "wandaa"
    assert "magnitude" in err.choices and "none" in err.choices


def test_bad_param_value_names_the_field(tmp_path):
    err = error(tmp_path, mutate("compressions", "mag", params={"sparsity": 1.5}))
    assert err.path == "compressions.mag.params.sparsity" and err.value == 1.5


def test_unknown_param_lists_valid_params(tmp_path):
    err = error(tmp_path, mutate("saes", "topk", params={"kk": 4}))
    assert err.path == "saes.topk.params.kk"
    assert "k" in err.choices and "expansion_factor" in err.choices


def test_matrix_reference_to_undefined_component(tmp_path):
    err = error(tmp_path, mutate("matrices", "m", compressions=["mag", "gptq"]))
    assert err.path == "matrices.m.compressions[1]" and err.value == "gptq" and err.choices == ["mag"]


def test_bad_hook_point(tmp_path):
    err = error(tmp_path, mutate("matrices", "m", hooks=["layers.1.resid_middle"]))
    assert err.path == "matrices.m.hooks" and "resid_post" in str(err)


def test_bad_sae_source(tmp_path):
    err = error(tmp_path, mutate("matrices", "m", sources=["original", "retrained-ish"]))
    assert err.path == "matrices.m.sources" and "pruned:<pruners entry>@" in str(err)


def test_unknown_section(tmp_path):
    data = dict(BASE, compresions={})
    err = error(tmp_path, data)
    assert err.path == "compresions" and "compressions" in err.choices


def test_name_defined_twice_names_both_files(tmp_path):
    first = write(tmp_path / "a.yaml", BASE)
    second = write(tmp_path / "b.yaml", {"compressions": {"mag": {"plugin": "none"}}})
    with pytest.raises(RegistryError) as info:
        load_registry([first, second], load_plugins(entry_points=False))
    assert str(first) in str(info.value) and str(second) in str(info.value)


def test_extra_file_extends_without_editing(tmp_path):
    first = write(tmp_path / "a.yaml", BASE)
    second = write(
        tmp_path / "b.yaml", {"compressions": {"mag-25": {"plugin": "magnitude", "params": {"sparsity": 0.25}}}}
    )
    reg = load_registry([first, second], load_plugins(entry_points=False))
    assert set(reg.compressions) == {"mag", "mag-25"}
    assert reg.origins["compressions.mag-25"] == str(second)


def test_unknown_matrix_lists_matrices(tmp_path):
    _, reg = load(tmp_path, BASE)
    with pytest.raises(RegistryError) as info:
        reg.matrix("smok")
    assert info.value.choices == ["m"]


def test_validate_exits_2_and_runs_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SAEX_HOME", str(tmp_path / "home"))
    bad = write(
        tmp_path / "reg.yaml", {"compressions": {"mag-bad": {"plugin": "magnitude", "params": {"sparsity": -0.1}}}}
    )
    assert main(["validate", "--registry", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "compressions.mag-bad.params.sparsity" in err and str(bad) in err
    assert not (tmp_path / "home").exists()


def test_project_registry_is_valid():
    assert main(["validate"]) == 0


# --- validation scope: one matrix's problems refuse that matrix only ------------------------------------------


def scoped(tmp_path: Path, data: dict, matrix: str | None):
    return load_registry([write(tmp_path / "reg.yaml", data)], load_plugins(entry_points=False), matrix=matrix)


def beside(**sections: dict) -> dict:
    """BASE with a second matrix ``other`` (``m``'s fields with ``other``'s changes) and extra entries."""
    data = yaml.safe_load(yaml.safe_dump(BASE))
    data["matrices"]["other"] = {**data["matrices"]["m"], **sections.pop("other", {})}
    for section, entries in sections.items():
        data.setdefault(section, {}).update(entries)
    return data


@pytest.mark.parametrize(
    "data,path,message",
    [
        (beside(other={"saes": ["nope"]}), "matrices.other.saes[0]", "not defined in saes (got 'nope')"),
        (beside(other={"sources": ["pruned:nope@0.5"]}), "matrices.other.sources[0]", "names no entry of pruners"),
        (beside(other={"corpus": "nope"}), "matrices.other.corpus", "not defined in corpora (got 'nope')"),
        (beside(other={"device": "tpu"}), "matrices.other.device", "String should match pattern"),
        (beside(other={"metric": ["rec"]}), "matrices.other.metric", "unknown key, did you mean 'metrics'?"),
        (
            beside(
                other={"compressions": ["bad"]},
                compressions={"bad": {"plugin": "magnitude", "params": {"sparsity": 2}}},
            ),
            "compressions.bad.params.sparsity",
            "Input should be less than 1 (got 2)",
        ),
        (
            beside(other={"saes": ["sw"]}, saes={"sw": {"plugin": "topk", "sweep": {"k": []}}}),
            "saes.sw.sweep.k",
            "must be a non-empty list of distinct values",
        ),
    ],
)
def test_a_broken_matrix_refuses_only_itself(tmp_path, data, path, message):
    reg = scoped(tmp_path, data, "m")
    assert reg.matrix("m").models == ["tiny"] and reg.component("compressions", "mag").params.sparsity == 0.5
    assert [(w.file, w.path) for w in reg.warnings] == [(str(tmp_path / "reg.yaml"), path)]
    assert message in str(reg.warnings[0])
    for refused in (
        lambda: scoped(tmp_path, data, "other"),
        lambda: reg.matrix("other"),
        lambda: scoped(tmp_path, data, None),
    ):
        with pytest.raises(RegistryError) as info:
            refused()
        assert info.value.path == path and message in str(info.value)


def test_an_entry_no_matrix_of_interest_uses_is_a_warning_and_refused_when_asked_for(tmp_path):
    data = beside(
        executors={"bad": {"plugin": "nope"}}, compressions={"odd": {"plugin": "magnitude", "params": {"x": 1}}}
    )
    reg = scoped(tmp_path, data, "m")
    assert sorted(w.path for w in reg.warnings) == ["compressions.odd.params.x", "executors.bad.plugin"]
    with pytest.raises(RegistryError) as info:
        reg.component("executors", "bad")
    assert info.value.path == "executors.bad.plugin" and info.value.value == "nope"
    with pytest.raises(RegistryError) as info:
        scoped(tmp_path, data, None)
    assert [e.path for e in info.value.errors] == ["compressions.odd.params.x", "executors.bad.plugin"]


def test_a_broken_entry_the_matrix_uses_refuses_it(tmp_path):
    data = beside(other={"saes": ["topk", "nope"]})
    data["saes"]["topk"]["params"] = {"k": -1}
    with pytest.raises(RegistryError) as info:
        scoped(tmp_path, data, "m")
    assert info.value.path == "saes.topk.params.k"  # m's own problem; other's undefined SAE is not m's
    with pytest.raises(RegistryError) as info:
        scoped(tmp_path, data, "other")
    assert sorted(e.path for e in info.value.errors) == ["matrices.other.saes[1]", "saes.topk.params.k"]


def test_problems_of_the_file_as_a_whole_refuse_every_matrix(tmp_path):
    data = dict(beside(), compresions={})
    with pytest.raises(RegistryError) as info:
        scoped(tmp_path, data, "m")
    assert info.value.path == "compresions" and "unknown section" in str(info.value)


def test_validate_and_the_warnings_of_other_matrices(tmp_path, capsys):
    data = beside(other={"saes": ["nope"]})  # renamed: the project's registry, read too, has a model "tiny"
    data["models"] = {"scope-tiny": data["models"].pop("tiny")}
    for matrix in data["matrices"].values():
        matrix["models"] = ["scope-tiny"]
    file = write(tmp_path / "reg.yaml", data)
    problem = f"{file}: matrices.other.saes[0]: not defined in saes (got 'nope'); valid choices: "
    assert main(["validate", "m", "--registry", str(file)]) == 0
    out, err = capsys.readouterr()
    assert err.startswith(f"saex: warning: {problem}") and len(err.splitlines()) == 1
    assert out.splitlines()[0] == "matrix m: 3 cells"
    assert out.splitlines()[1].startswith("matrix m OK (1 problem elsewhere, warned above): ")
    assert main(["validate", "other", "--registry", str(file)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"saex: error: {problem}") and len(err.splitlines()) == 1
    assert main(["validate", "--registry", str(file)]) == 2
    assert capsys.readouterr().err.startswith(f"saex: error: {problem}")
