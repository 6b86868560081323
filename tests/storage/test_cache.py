"""The content-addressed cache: keys, atomic publication, verification and quarantine of corrupt entries."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from saex.storage.cache import MANIFEST, Cache, CacheError, _digest, cache_key
from saex.storage.fingerprints import file_digest

PARTS: dict[str, Any] = {
    "model": "tiny-llama:0123abcd",
    "compression": {"method": "magnitude", "sparsity": 0.5, "layers": [0, 1, 2]},
    "tokens": 1000,
    "dtype": "float32",
    "hook": "layers.1.resid_post",
    "version": 1,
}


def mutations(parts: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """One copy of ``parts`` per single change: each value changed, each key dropped, one key added."""
    out = []
    for name, value in parts.items():
        changed = copy.deepcopy(parts)
        if isinstance(value, dict):
            for sub in value:
                nested = copy.deepcopy(parts)
                nested[name][sub] = [*value[sub], 3] if isinstance(value[sub], list) else f"{value[sub]}x"
                out.append((f"{name}.{sub}", nested))
            continue
        changed[name] = value + 1 if isinstance(value, int) else f"{value}x"
        out.append((name, changed))
        dropped = {k: v for k, v in parts.items() if k != name}
        out.append((f"-{name}", dropped))
    out.append(("+extra", {**parts, "extra": None}))
    out.append(("tokens as str", {**parts, "tokens": "1000"}))
    return out


def test_cache_key_changes_with_every_part() -> None:
    base = cache_key(PARTS)
    assert len(base) == 24 and int(base, 16) >= 0
    keys = {label: cache_key(parts) for label, parts in mutations(PARTS)}
    assert len(keys) >= 12
    for label, key in keys.items():
        assert key != base, label
    assert len(set(keys.values())) == len(keys)


def test_cache_key_ignores_key_order() -> None:
    reordered = {k: PARTS[k] for k in reversed(list(PARTS))}
    reordered["compression"] = {k: PARTS["compression"][k] for k in reversed(list(PARTS["compression"]))}
    assert list(reordered) != list(PARTS)
    assert cache_key(reordered) == cache_key(PARTS) == cache_key(copy.deepcopy(PARTS))


def write_two_files(directory: Path) -> dict[str, Any]:
    (directory / "a.bin").write_bytes(bytes(range(256)) * 4)
    (directory / "b.txt").write_text("hello cache\n")
    return {"n_tokens": 1024, "note": "two files"}


def test_put_then_get_returns_the_published_directory(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    assert cache.get("things", "k1") is None
    path = cache.put("things", "k1", write_two_files)
    assert path == tmp_path / "things" / "k1" == cache.dir("things", "k1")
    assert cache.get("things", "k1") == path
    assert sorted(p.name for p in path.iterdir()) == ["a.bin", "b.txt", MANIFEST]
    assert (path / "a.bin").read_bytes() == bytes(range(256)) * 4
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["key"] == "k1"
    assert manifest["files"] == {"a.bin": file_digest(path / "a.bin"), "b.txt": file_digest(path / "b.txt")}
    assert cache.meta("things", "k1") == {"n_tokens": 1024, "note": "two files"}
    assert [p.name for p in (tmp_path / "things").iterdir()] == ["k1"]  # no temp dir left behind


def test_put_keeps_an_entry_published_first(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    cache.put("things", "k1", write_two_files)

    def other(directory: Path) -> dict[str, Any]:
        (directory / "a.bin").write_bytes(b"other")
        return {"n_tokens": 5}

    path = cache.put("things", "k1", other)
    assert (path / "a.bin").read_bytes() == bytes(range(256)) * 4
    assert cache.meta("things", "k1")["n_tokens"] == 1024
    assert [p.name for p in (tmp_path / "things").iterdir()] == ["k1"]


def flip_byte(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flip", "delete", "append"])
def test_corrupt_entry_is_moved_aside_and_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    cache = Cache(tmp_path)
    path = cache.put("things", "k1", write_two_files)
    if damage == "flip":
        flip_byte(path / "a.bin")
    elif damage == "delete":
        (path / "a.bin").unlink()
    else:
        with open(path / "a.bin", "ab") as f:
            f.write(b"\0")
    capsys.readouterr()

    assert cache.get("things", "k1") is None
    assert not path.exists()
    aside = [p for p in (tmp_path / "things").iterdir() if p.name.startswith("k1.corrupt-")]
    assert len(aside) == 1
    assert (aside[0] / "b.txt").read_text() == "hello cache\n"  # moved, not deleted: kept for inspection
    err = capsys.readouterr().err
    assert "things/k1" in err and "a.bin" in err and "b.txt" not in err and str(aside[0]) in err

    assert cache.get("things", "k1") is None  # still a miss, and nothing more is reported
    assert capsys.readouterr().err == ""
    assert cache.put("things", "k1", write_two_files) == path  # the key can be rebuilt
    assert cache.get("things", "k1") == path


def test_unreadable_manifest_is_treated_as_corrupt(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """BUG (``saex.storage.cache``, Cache.get): a manifest that is not valid JSON (truncated by a full disk, edited by
    hand) makes ``get`` raise JSONDecodeError, and since the entry stays in place every later run fails the
    same way. It should be moved aside and reported like any other corrupt entry."""
    cache = Cache(tmp_path)
    path = cache.put("things", "k1", write_two_files)
    manifest = path / MANIFEST
    manifest.write_text(manifest.read_text()[:20])
    assert cache.get("things", "k1") is None
    assert not path.exists()
    assert any(p.name.startswith("k1.corrupt-") for p in (tmp_path / "things").iterdir())
    assert "things/k1" in capsys.readouterr().err


@pytest.mark.parametrize("error", [RuntimeError("writer failed"), KeyboardInterrupt()])
def test_failed_writer_leaves_nothing_behind(tmp_path: Path, error: BaseException) -> None:
    cache = Cache(tmp_path)

    def write(directory: Path) -> dict[str, Any]:
        write_two_files(directory)
        raise error

    with pytest.raises(type(error)):
        cache.put("things", "k1", write)
    assert list((tmp_path / "things").iterdir()) == []
    assert cache.get("things", "k1") is None


def test_two_corruptions_of_one_key_in_the_same_second(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """BUG (minor; ``saex.storage.cache``, Cache.get): the quarantine name ``{key}.corrupt-{int(time.time())}`` has
    one-second resolution, so when a rebuilt entry is found corrupt again within the same second, os.replace
    onto the non-empty first quarantine dir raises OSError (ENOTEMPTY) instead of returning None."""
    cache = Cache(tmp_path)
    for _ in range(2):
        path = cache.put("things", "k1", write_two_files)
        flip_byte(path / "a.bin")
        assert cache.get("things", "k1") is None
    assert len([p for p in (tmp_path / "things").iterdir() if p.name.startswith("k1.corrupt-")]) == 2


def _edit_manifest(path: Path, edit) -> None:
    manifest = json.loads((path / MANIFEST).read_text())
    edit(manifest)
    (path / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "edit,problem",
    [
        (lambda m: m["meta"].update(n_tokens=999), "manifest.json does not match its digest"),
        (lambda m: m.update(files={}), "manifest.json does not match its digest"),
        (lambda m: m.pop("digest"), "unreadable manifest.json"),
    ],
)
def test_an_edited_manifest_is_caught_and_recomputed(tmp_path, capsys, edit, problem):
    """The manifest's ``meta`` (model loss, costs) and its file list are covered by its digest."""
    cache = Cache(tmp_path)
    path = cache.put("things", "k1", write_two_files)
    _edit_manifest(path, edit)
    assert cache.get("things", "k1") is None
    assert problem in capsys.readouterr().err
    cache.put("things", "k1", write_two_files)
    assert cache.meta("things", "k1")["n_tokens"] == 1024


def test_a_directory_without_manifest_or_with_an_unlisted_file_is_moved_aside(tmp_path, capsys):
    cache = Cache(tmp_path)
    path = cache.put("things", "k1", write_two_files)
    (path / "planted.bin").write_bytes(b"x")
    assert cache.get("things", "k1") is None and "files not in the manifest: planted.bin" in capsys.readouterr().err
    path = cache.put("things", "k1", write_two_files)
    (path / MANIFEST).unlink()
    assert cache.get("things", "k1") is None and "no manifest.json" in capsys.readouterr().err
    assert cache.put("things", "k1", write_two_files) == path and cache.get("things", "k1") == path


@pytest.mark.parametrize("name", ["../k2/a.bin", "/etc/hostname", "..", "c.bin"])
def test_names_from_a_manifest_never_leave_the_directory(tmp_path, name):
    cache = Cache(tmp_path)
    cache.put("things", "k1", write_two_files)
    cache.put("things", "k2", write_two_files)
    assert cache.file("things", "k1", "a.bin") == tmp_path / "things" / "k1" / "a.bin"
    with pytest.raises(CacheError, match="is not a file of this artifact"):
        cache.file("things", "k1", name)


def _list_in_manifest(path: Path, name: str, target: Path) -> None:
    """Add ``name`` to an entry's manifest with ``target``'s hash, and make the digest match (a forger's edit)."""
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["files"][name] = file_digest(target)
    manifest["digest"] = _digest(manifest["key"], manifest["meta"], manifest["files"])
    (path / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("name", ["../../../outside.txt", "OUTSIDE", "../k2/a.bin", "./a.bin"])
def test_a_manifest_listing_a_name_out_of_its_directory_is_corrupt(tmp_path, capsys, name):
    """Hostile case (issue 21): a manifest whose file list names a file outside the entry, with its hash and the
    digest made to match, had ``get`` hash that file and accept the entry. The name is refused before anything
    is opened, as ``files`` refuses it; the entry is moved aside and rebuilt like any corrupt one."""
    cache = Cache(tmp_path / "cache")
    outside = tmp_path / "outside.txt"
    outside.write_text("not the cache's\n")
    cache.put("things", "k2", write_two_files)
    path = cache.put("things", "k1", write_two_files)
    name = str(outside) if name == "OUTSIDE" else name
    _list_in_manifest(path, name, path / name)  # every one of these names reaches a real file with that hash
    assert cache.get("things", "k1") is None
    err = capsys.readouterr().err
    problem = f"manifest.json lists names that are not plain file names of the entry: {name!r}"
    assert f"saex: cached things/k1 failed verification ({problem}); moved to {tmp_path / 'cache'}" in err
    assert outside.read_text() == "not the cache's\n" and cache.get("things", "k2") is not None
    assert cache.put("things", "k1", write_two_files) == path and cache.get("things", "k1") == path


def _planted_symlink(path: Path, outside: Path) -> str:
    (outside / "a.bin").write_bytes((path / "a.bin").read_bytes())  # the same bytes: only the link is wrong
    (path / "a.bin").unlink()
    (path / "a.bin").symlink_to(outside / "a.bin")
    return "not plain files: a.bin (symbolic link)"


def _symlinked_manifest(path: Path, outside: Path) -> str:
    (outside / MANIFEST).write_bytes((path / MANIFEST).read_bytes())
    (path / MANIFEST).unlink()
    (path / MANIFEST).symlink_to(outside / MANIFEST)
    return "manifest.json is a symbolic link, not a plain file"


def _symlinked_entry(path: Path, outside: Path) -> str:
    copy = outside / "k1"
    path.rename(copy)
    path.symlink_to(copy, target_is_directory=True)
    return "the entry is a symbolic link, not a folder"


def _planted_folder(path: Path, outside: Path) -> str:
    (path / "sub").mkdir()
    return "not plain files: sub (folder)"


@pytest.mark.parametrize("damage", [_planted_symlink, _symlinked_manifest, _symlinked_entry, _planted_folder])
def test_a_symlink_inside_an_entry_is_corrupt_on_read_as_on_write(tmp_path, capsys, damage):
    """Hostile case (issue 21): a file of an entry (an activation shard) replaced by a symbolic link to a copy
    outside the cache was followed and accepted; ``put`` refuses links, and now ``get`` does too: the entry is
    moved aside (the link itself, never its target) and rebuilt."""
    cache = Cache(tmp_path / "cache")
    outside = tmp_path / "outside"
    outside.mkdir()
    path = cache.put("things", "k1", write_two_files)
    problem = damage(path, outside)
    before = sorted((p.name, p.read_bytes()) for p in outside.rglob("*") if p.is_file())
    assert cache.get("things", "k1") is None
    assert f"saex: cached things/k1 failed verification ({problem}); moved to" in capsys.readouterr().err
    assert sorted((p.name, p.read_bytes()) for p in outside.rglob("*") if p.is_file()) == before
    assert [p.name.split("-")[0] for p in (tmp_path / "cache" / "things").iterdir()] == ["k1.corrupt"]
    assert cache.put("things", "k1", write_two_files) == path and cache.get("things", "k1") == path
    assert not any(p.is_symlink() for p in path.iterdir())


def test_put_refuses_a_symlink(tmp_path):
    def linked(directory: Path) -> dict[str, Any]:
        (directory / "a.bin").symlink_to(tmp_path / "elsewhere")
        return {}

    with pytest.raises(CacheError, match="things/k1: an artifact holds plain files only"):
        Cache(tmp_path).put("things", "k1", linked)


def test_temporary_directories_of_dead_processes_are_removed(tmp_path):
    import socket

    dead = _a_dead_pid()
    stale = tmp_path / "activations" / f".tmp-{socket.gethostname()}-{dead}-collect.abc"
    stale.mkdir(parents=True)
    mine = Cache(tmp_path).temporary(tmp_path / "activations", "collect")
    Cache(tmp_path)  # a second cache opened on this host: the stale one goes, the live process's stays
    assert not stale.exists() and mine.exists()


def _a_dead_pid() -> int:
    import subprocess

    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid
