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
