"""Hostile and careless registry input: every case is exit 2 with the file, the YAML path and the value, never a
traceback, a hang or a runaway allocation; run-time discoveries are reported before anything is computed.
Ends with a property-based fuzz test over registry structures and values."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import shutil
import sqlite3
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny3_matrix, tiny3_sections
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from saex.cli import main
from saex.storage.cache import MANIFEST, _digest
from saex.storage.fingerprints import file_digest
from saex.storage.results import ResultsStore
from saex.testing import doc_corpus

BASE = {  # names not in the project's registry.yaml, which every command loads too
    "models": {"bi-tiny": {"plugin": "tiny-llama", "params": {"num_hidden_layers": 2}}},
    "corpora": {"bi-kjv": {"plugin": "kjv"}},
    "compressions": {"bi-mag": {"plugin": "magnitude", "params": {"sparsity": 0.5}}},
    "saes": {"bi-s": {"plugin": "topk", "params": {"expansion_factor": 2, "k": 4}, "training": {"tokens": 1024}}},
    "metrics": {"bi-rec": {"plugin": "reconstruction"}},
    "matrices": {
        "bad": {
            "models": ["bi-tiny"],
            "corpus": "bi-kjv",
            "compressions": ["bi-mag"],
            "hooks": ["layers.1.resid_post"],
            "saes": ["bi-s"],
            "metrics": ["bi-rec"],
            "tokens": {"train": 1024, "calibration": 256, "eval": 256},
            "block_size": 64,
            "device": "cpu",
        }
    },
}


def validate(capsys, *files: Path) -> tuple[int, str]:
    args = ["validate"]
    for f in files:
        args += ["--registry", str(f)]
    code = main(args)
    return code, capsys.readouterr().err


def write_text(tmp_path: Path, text: str, name: str = "reg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text,expected",
    [
        ("models:\n  a: {plugin: hf}\n  a: {plugin: hf}\n", "line 3, column 3: not valid YAML: key 'a' given twice"),
        ("models:\n  a: {plugin: tiny-llama, plugin: hf}\n", "not valid YAML: key 'plugin' given twice"),
        ("models:\n  50: {plugin: tiny-llama}\n", "models: every key must be a string: 50 is a YAML int (quote it)"),
        ("models:\n  no: {plugin: tiny-llama}\n", "every key must be a string: False is a YAML bool"),
        ("models:\n  null: {plugin: tiny-llama}\n", "every key must be a string: None is a YAML NoneType"),
        ("saes:\n  s: {plugin: topk, training: {lr: .inf}}\n", "saes.s.training.lr: must be a finite number"),
        ("compressions:\n  c: {plugin: magnitude, params: {sparsity: .nan}}\n", "must be a finite number"),
        ("[" * 20_000 + "]" * 20_000, "nested too deeply"),
        ("models: [unclosed\n", "line 2, column 1: not valid YAML: expected ',' or ']'"),
    ],
)
def test_bad_registry_text_is_exit_2_with_the_place(tmp_path, capsys, text, expected):
    code, err = validate(capsys, write_text(tmp_path, text))
    assert code == 2 and expected in err and "Traceback" not in err and str(tmp_path) in err


def test_an_alias_bomb_is_refused_quickly_and_not_printed(tmp_path, capsys):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join(['*a' + str(i - 1)] * 9)}]" for i in range(1, 9)]
    text = "models:\n  m:\n    plugin: tiny-llama\n    params:\n" + "".join(f"      {line}\n" for line in lines)
    start = time.perf_counter()
    code, err = validate(capsys, write_text(tmp_path, text))
    assert code == 2 and "more than 200000 values once aliases are expanded" in err
    assert time.perf_counter() - start < 10 and len(err) < 2000


def test_files_that_are_not_registry_files(tmp_path, capsys):
    directory = tmp_path / "dir"
    directory.mkdir()
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(bytes(range(256)))
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("models:\n  caf\xe9: {plugin: hf}\n".encode("latin-1"))
    huge = tmp_path / "huge.yaml"
    huge.write_text("# " + "x" * (3 * 1024 * 1024))
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)  # opening it would block forever: it must never be opened
    cases = {
        directory: "is a directory",
        binary: "not UTF-8 text",
        latin1: "not UTF-8 text (byte 13)",
        huge: "a registry file holds at most 2097152",
        fifo: "is not a regular file",
        Path("/dev/zero"): "is not a regular file",
        tmp_path / "missing.yaml": "registry file not found",
    }
    for path, expected in cases.items():
        code, err = validate(capsys, path)
        assert code == 2 and expected in err and str(path) in err, (path, err)


@pytest.mark.parametrize(
    "edit,expected",
    [
        (lambda d: d["matrices"]["bad"].update(device="tpu"), "matrices.bad.device: String should match pattern"),
        (lambda d: d["matrices"]["bad"].update(hooks=["layers.1.resid_post"] * 2), "listed more than once"),
        (lambda d: d["matrices"]["bad"].update(compressions=["bi-mag"] * 2), "listed more than once: bi-mag"),
    ],
)
def test_bad_matrix_fields_are_exit_2(tmp_path, capsys, edit, expected):
    data = copy.deepcopy(BASE)
    edit(data)
    code, err = validate(capsys, write_text(tmp_path, yaml.safe_dump(data)))
    assert code == 2 and expected in err


def run(tmp_path, capsys, data: dict, *extra: str) -> tuple[int, str, Path]:
    store = tmp_path / "results.sqlite"
    path = write_text(tmp_path, yaml.safe_dump(data))
    code = main(["run", "bad", "--registry", str(path), "--store", str(store), "--no-progress", *extra])
    return code, capsys.readouterr().err, store


def _rows(store: Path) -> int:
    if not store.exists():
        return 0
    with sqlite3.connect(store) as db:
        return db.execute("select count(*) from cells").fetchone()[0]


@pytest.mark.parametrize(
    "edit,extra,expected",
    [
        (
            lambda d: d["models"]["bi-tiny"]["params"].update(hidden_size=63),
            (),
            "models.bi-tiny.params: cannot build the model",
        ),
        (
            lambda d: d["matrices"]["bad"]["tokens"].update(train=10**9),
            (),
            "matrices.bad.tokens: the corpus is too small",
        ),
        (lambda d: d["matrices"]["bad"].update(hooks=["layers.7.resid_post"]), (), "matrices.bad.hooks[0]"),
        pytest.param(
            lambda d: None,
            ("--device", "cuda"),
            "--device: device 'cuda' requested but CUDA is not available",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA"),
        ),
    ],
)
def test_run_time_discoveries_are_exit_2_before_computing(tmp_path, capsys, monkeypatch, edit, extra, expected):
    monkeypatch.setenv("SAEX_HOME", str(tmp_path / "home"))
    data = copy.deepcopy(BASE)
    edit(data)
    code, err, store = run(tmp_path, capsys, data, *extra)
    assert code == 2 and expected in err and "Traceback" not in err
    assert _rows(store) == 0  # nothing started, nothing computed
    assert not (tmp_path / "home" / "cache" / "activations").exists()


def test_a_bad_device_argument_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "bad", "--device", "foo"])
    assert exc.value.code == 2 and "'foo' is not a device" in capsys.readouterr().err


# --- one matrix beside a broken one; the last holes of the hostile-input probe (issue 21) ---------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory, single_thread_module):
    """``saex run good`` through the CLI on the tiny3 matrix (original SAE on M and M_c), in a registry file that
    also holds ``broken``, a matrix naming an SAE nobody defined: (root, registry file, store, exit code, stderr)."""
    root = tmp_path_factory.mktemp("finished")
    small = {"sources": ["original"], "metrics": ["reconstruction"]}
    tokens = {"train": 1024, "calibration": 256, "eval": 256}
    data = {
        **tiny3_sections(doc_corpus(root / "corpus"), 1024),
        "matrices": {"good": tiny3_matrix(**small, tokens=tokens), "broken": tiny3_matrix(**small, saes=["nope"])},
    }
    registry = write_text(root, yaml.safe_dump(data))
    store = root / "results.sqlite"
    err = io.StringIO()
    with (
        pytest.MonkeyPatch.context() as patch,
        contextlib.redirect_stderr(err),
        contextlib.redirect_stdout(io.StringIO()),
    ):
        patch.setenv("SAEX_HOME", str(root / "home"))
        code = main(["run", "good", "--registry", str(registry), "--store", str(store), "--no-progress"])
    return root, registry, store, code, err.getvalue()


def _broken_problem(registry: Path) -> str:
    return f"{registry}: matrices.broken.saes[0]: not defined in saes (got 'nope'); valid choices: "


def test_a_matrix_runs_beside_a_broken_one_which_is_refused(finished, tmp_path, capsys, monkeypatch):
    """Issue 21 item 4: `saex run` / `saex validate` of a matrix refuse only on that matrix's problems (or the
    file's); another matrix's are one warning line each."""
    _, registry, store, code, err = finished
    assert code == 0 and _rows(store) == 2
    warned = [line for line in err.splitlines() if "broken" in line]
    assert len(warned) == 1 and warned[0].startswith(f"saex: warning: {_broken_problem(registry)}")
    assert main(["validate", "good", "--registry", str(registry)]) == 0
    assert capsys.readouterr().err.startswith(f"saex: warning: {_broken_problem(registry)}")
    monkeypatch.setenv("SAEX_HOME", str(tmp_path / "home"))
    for command in ("run", "validate"):
        extra = ["--store", str(tmp_path / "r.sqlite")] if command == "run" else []
        assert main([command, "broken", "--registry", str(registry), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"saex: error: {_broken_problem(registry)}") and len(err.splitlines()) == 1
    assert not (tmp_path / "r.sqlite").exists() and not (tmp_path / "home").exists()


def test_tampered_cache_entries_are_moved_aside_and_recomputed(finished, tmp_path, capsys, monkeypatch):
    """Issue 21 item 7 (a), (b) through the CLI: an activation shard replaced by a symbolic link to a copy
    outside the cache, and a token cache whose manifest lists a file outside the cache (hash and digest made to
    match), were accepted. Both are now corrupt entries: moved aside, reported, recomputed to the same numbers."""
    root, registry, store, _, _ = finished
    home = tmp_path / "home"
    shutil.copytree(root / "home", home, symlinks=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    shards = sorted((home / "cache" / "activations").glob("*/shard_*.safetensors"))
    for i, shard in enumerate(shards):
        shutil.copy(shard, outside / f"{i}.safetensors")
        shard.unlink()
        shard.symlink_to(outside / f"{i}.safetensors")
    (tokens,) = (home / "cache" / "tokens").iterdir()
    (tmp_path / "secret.txt").write_text("not the cache's\n")
    manifest = json.loads((tokens / MANIFEST).read_text())
    manifest["files"]["../../../../secret.txt"] = file_digest(tmp_path / "secret.txt")
    manifest["digest"] = _digest(manifest["key"], manifest["meta"], manifest["files"])
    (tokens / MANIFEST).write_text(json.dumps(manifest))
    monkeypatch.setenv("SAEX_HOME", str(home))
    again = tmp_path / "again.sqlite"
    assert main(["run", "good", "--registry", str(registry), "--store", str(again), "--no-progress"]) == 0
    refused = [line for line in capsys.readouterr().err.splitlines() if "failed verification" in line]
    problem = "manifest.json lists names that are not plain file names of the entry: '../../../../secret.txt'"
    assert refused[0].startswith(f"saex: cached tokens/{tokens.name} failed verification ({problem}); moved to ")
    link = "not plain files: shard_00000.safetensors (symbolic link)"
    assert sorted(line.split(" failed verification ")[1].split(";")[0] for line in refused[1:]) == [f"({link})"] * len(
        shards
    )
    assert len(shards) == 3 and len(refused) == 4
    cached = home / "cache" / "activations"
    assert not any(p.is_symlink() for p in cached.glob("*/*") if ".corrupt-" not in p.parent.name)
    first, second = ResultsStore.existing(store), ResultsStore.existing(again)
    assert {r.key: r.metrics for r in second.rows()} == {r.key: r.metrics for r in first.rows()}


def test_report_on_a_row_whose_details_is_not_json_is_exit_2(finished, tmp_path, capsys):
    """Issue 21 item 7 (c): a JSONDecodeError traceback (exit 1) before; the store is left as it was."""
    _, registry, store, _, _ = finished
    copy_ = tmp_path / "store.sqlite"
    shutil.copy(store, copy_)
    with sqlite3.connect(copy_) as db:
        (key,) = db.execute("select key from cells order by rowid limit 1").fetchone()
        db.execute("update cells set details = '{not json' where key = ?", (key,))
    db.close()
    before = copy_.read_bytes()
    problem = (
        f"saex: error: {copy_}: row {key!r}: column 'details' is not valid JSON (Expecting property name enclosed "
        "in double quotes: line 1 column 2 (char 1)); the store was left as it was"
    )
    for matrix in (["good", "--registry", str(registry)], []):
        assert main(["report", *matrix, "--store", str(copy_)]) == 2
        assert capsys.readouterr().err.splitlines()[-1] == problem
    assert copy_.read_bytes() == before


def test_report_out_on_a_file_is_exit_2(finished, tmp_path, capsys):
    """Issue 21 item 7 (d): `--out X` where X is a file was a FileExistsError traceback."""
    _, _, store, _, _ = finished
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    assert main(["report", "--store", str(store), "--out", str(notes)]) == 2
    assert (
        capsys.readouterr().err == f"saex: error: {notes}: is a file, not a folder; --out names the report's folder\n"
    )
    assert main(["report", "--store", str(store), "--out", str(notes / "sub")]) == 2
    expected = f"saex: error: {notes}: is a file, not a folder (on the way to {notes / 'sub'}); --out names "
    assert capsys.readouterr().err == expected + "the report's folder\n"
    assert notes.read_text() == "my notes\n"


def test_a_store_that_is_not_a_saex_store_is_exit_2_and_left_as_it_was(tmp_path, capsys, monkeypatch):
    """Issue 21 item 7 (e): `saex run --store notes.txt` was an sqlite3.DatabaseError traceback. A text file,
    a folder or another program's SQLite database is refused before SQLite writes to it."""
    monkeypatch.setenv("SAEX_HOME", str(tmp_path / "home"))
    notes = tmp_path / "notes.txt"
    notes.write_text("hello, my notes\n" * 20)
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as db:
        db.execute("create table things (x)")
    db.close()
    folder = tmp_path / "folder"
    folder.mkdir()
    hint = "--store names the SQLite file a run writes its results into"
    cases = {
        notes: f"not a saex results store (not an SQLite database: it starts b'hello, m'); {hint}",
        other: f"not a saex results store (an SQLite database of tables things); {hint}",
        folder: f"is a folder, not a saex results store; {hint}",
    }
    registry = write_text(tmp_path, yaml.safe_dump(BASE))
    for path, problem in cases.items():
        before = {p: p.read_bytes() for p in (notes, other)}
        assert main(["run", "bad", "--registry", str(registry), "--store", str(path), "--no-progress"]) == 2
        assert capsys.readouterr().err == f"saex: error: {path}: {problem}\n"
        assert {p: p.read_bytes() for p in (notes, other)} == before and list(folder.iterdir()) == []
    assert main(["report", "--store", str(notes)]) == 2
    wrote = "--store names the SQLite file a run wrote its results into"
    expected = (
        f"saex: error: {notes}: not a saex results store (not an SQLite database: it starts b'hello, m'); {wrote}\n"
    )
    assert capsys.readouterr().err == expected
    assert not (tmp_path / "home" / "cache" / "activations").exists()


# --- property-based: no registry file reaches the user as a traceback --------------------------------------

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.text(max_size=8), st.integers()), inner, max_size=4)
    ),
    max_leaves=20,
)
_paths = st.lists(st.sampled_from([*BASE, "plugin", "params", "training", "bi-tiny", "bad", "bi-s", "hooks", "tokens"]),
                  min_size=1, max_size=4)  # fmt: skip


def _mutated(path: list[str], value: object) -> dict:
    """BASE with the value at ``path`` (created where missing) replaced by ``value``."""
    data = copy.deepcopy(BASE)
    node: object = data
    for key in path[:-1]:
        if not isinstance(node, dict):
            return data
        node = node.setdefault(key, {})
    if isinstance(node, dict):
        node[path[-1]] = value
    return data


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=_paths, value=_values)
def test_fuzzed_registries_never_raise_past_the_cli(tmp_path, capsys, path, value):
    try:
        text = yaml.safe_dump(_mutated(path, value), allow_unicode=True)
    except yaml.YAMLError:
        return
    code, err = validate(capsys, write_text(tmp_path, text))
    assert code in (0, 2), err
    if code == 2:
        assert err.startswith("saex: error: ") and str(tmp_path) in err
