"""Content-addressed artifact cache: a directory per (kind, key), written atomically with a manifest checked
before every reuse. A key is the hash of everything that determines the artifact.

The manifest is closed: it lists every file of the directory with its sha256 and carries a digest over the
key, the files and the ``meta`` values (model loss, costs), so an edited value, a listed file that changed, a
file that is not listed and a missing or unreadable manifest are all caught; the directory is then moved
aside, reported, and the artifact recomputed. Names read from a manifest never leave their directory: every
name a manifest lists is checked (``plain_name``) before anything is opened, by the verification and by
``files``, and a symbolic link (to anywhere), a folder or a special file inside an entry makes it corrupt, as
``put`` refuses them. Temporary directories are named for the host and process that made them, and those of
processes that died are removed when a cache is opened.

Several processes may share a cache: ``computed`` holds an exclusive lock per artifact (``fcntl.flock`` on a
file under ``locks/``) while it checks and computes, so an artifact is computed once and the other processes
wait for it; the operating system releases the lock of a process that dies.

Trust model: the cache guards against corruption and interrupted writes and never executes what it reads
(no pickle anywhere); it is not a defence against someone who can rewrite both a file and its manifest.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from saex.storage.fingerprints import file_digest

MANIFEST = "manifest.json"
_TMP = ".tmp-"


def cache_key(parts: dict[str, Any]) -> str:
    """Stable hash of a JSON-able description of an artifact's inputs."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _digest(key: str, meta: Any, files: dict[str, str]) -> str:
    body = json.dumps({"key": key, "meta": meta, "files": files}, sort_keys=True, default=str)
    return hashlib.sha256(body.encode()).hexdigest()


class CacheError(RuntimeError):
    """A cached artifact that cannot be used (named), though it passed ``get`` earlier."""


class Cache:
    def __init__(self, root: Path):
        self.root = Path(root)
        self._owner = f"{_TMP}{socket.gethostname()}-{os.getpid()}-"
        self.remove_stale_temporaries()

    def dir(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def get(self, kind: str, key: str) -> Path | None:
        """The artifact's directory if present and intact; anything else there is moved aside and reported."""
        path = self.dir(kind, key)
        if not path.exists():
            return None
        problems = self._problems(path, key)
        if problems:
            aside = path.with_name(f"{key}.corrupt-{time.time_ns()}-{os.getpid()}")
            os.replace(path, aside)
            print(f"saex: cached {kind}/{key} failed verification ({problems}); moved to {aside}", file=sys.stderr)
            return None
        return path

    def meta(self, kind: str, key: str) -> dict[str, Any]:
        """The verified ``meta`` of an artifact ``get`` returned."""
        path = self.dir(kind, key)
        try:
            manifest = json.loads((path / MANIFEST).read_text())
            if manifest["digest"] != _digest(key, manifest["meta"], manifest["files"]):
                raise ValueError("digest mismatch")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CacheError(f"{path / MANIFEST}: unreadable or changed since it was verified ({exc})") from None
        return manifest["meta"]

    def file(self, kind: str, key: str, name: str) -> Path:
        """A file of an artifact by a name read from its manifest or meta (``files`` for one name)."""
        return self.files(kind, key, [name])[0]

    def files(self, kind: str, key: str, names: Iterable[str]) -> list[Path]:
        """Files of an artifact by names read from its manifest or meta: plain names the manifest lists, never
        paths out of the directory (the manifest is read once for all of them)."""
        path = self.dir(kind, key)
        listed = json.loads((path / MANIFEST).read_text())["files"]
        found = []
        for name in names:
            if not plain_name(name) or name not in listed:
                raise CacheError(f"{path / MANIFEST}: {name!r} is not a file of this artifact")
            found.append(path / name)
        return found

    def put(self, kind: str, key: str, write: Callable[[Path], dict[str, Any]]) -> Path:
        """Run ``write(tmpdir) -> meta`` and publish the directory under the key with its manifest."""
        final = self.dir(kind, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.temporary(final.parent, key)
        try:
            meta = write(tmp)
            if any(p.is_dir() or p.is_symlink() for p in tmp.iterdir()):
                raise CacheError(f"{kind}/{key}: an artifact holds plain files only")
            files = {p.name: file_digest(p) for p in sorted(tmp.iterdir())}
            manifest = {"key": key, "meta": meta, "files": files, "digest": _digest(key, meta, files)}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
            if final.exists():  # another process finished first: keep theirs
                shutil.rmtree(tmp)
            else:
                os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def computed(self, kind: str, key: str, write: Callable[[Path], dict[str, Any]]) -> Path:
        """The artifact's directory, computed with ``write`` (as in ``put``) unless it is cached; concurrent
        callers in other processes wait for one computation instead of repeating it."""
        with self.locked(kind, key):
            return self.get(kind, key) or self.put(kind, key, write)

    @contextlib.contextmanager
    def locked(self, *names: str) -> Iterator[None]:
        """Hold the exclusive lock of artifact ``names`` (e.g. kind, key) for the duration of the block."""
        locks = self.root / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        with open(locks / ("-".join(names) + ".lock"), "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def temporary(self, parent: Path, label: str) -> Path:
        """A fresh temporary directory in ``parent`` owned by this process (removed by ``put`` or, after a
        crash, by the next cache opened on this host)."""
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"{self._owner}{label}.", dir=parent))

    def remove_stale_temporaries(self) -> None:
        """Remove temporary directories left by processes of this host that no longer run."""
        mine = f"{_TMP}{socket.gethostname()}-"
        if not self.root.is_dir():
            return
        for kind in self.root.iterdir():
            if not kind.is_dir() or kind.name == "locks":
                continue
            for entry in kind.iterdir():
                if entry.name.startswith(mine):
                    pid = entry.name[len(mine) :].split("-", 1)[0]
                    if pid.isdigit() and not _alive(int(pid)):
                        shutil.rmtree(entry, ignore_errors=True)

    @staticmethod
    def _problems(path: Path, key: str) -> str:
        """What is wrong with a published directory, or "" when it is intact. Nothing is opened before it is
        known to be a plain file of the directory: a symbolic link (to anywhere), a folder or a special file in
        the entry, and a name in the manifest that is not a plain file name, are problems, never followed."""
        if _kind(path) != "folder":
            return f"the entry is a {_kind(path)}, not a folder"
        kinds = {p.name: _kind(p) for p in path.iterdir()}
        if MANIFEST not in kinds:
            return f"no {MANIFEST}"
        if kinds[MANIFEST] != "file":
            return f"{MANIFEST} is a {kinds[MANIFEST]}, not a plain file"
        try:
            manifest = json.loads((path / MANIFEST).read_text())
            files, meta = dict(manifest["files"]), manifest["meta"]
            if manifest["key"] != key or manifest["digest"] != _digest(key, meta, files):
                return f"{MANIFEST} does not match its digest"
        except FileNotFoundError:
            return f"no {MANIFEST}"
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            return f"unreadable {MANIFEST}"
        outside = [repr(n) for n in files if not plain_name(n)]
        if outside:
            return f"{MANIFEST} lists names that are not plain file names of the entry: {', '.join(outside)}"
        del kinds[MANIFEST]
        odd = [f"{n} ({k})" for n, k in sorted(kinds.items()) if k != "file"]
        if odd:
            return f"not plain files: {', '.join(odd)}"
        unlisted = sorted(set(kinds) - set(files))
        if unlisted:
            return f"files not in the manifest: {', '.join(unlisted)}"
        bad = [n for n, digest in files.items() if n not in kinds or file_digest(path / n) != digest]
        return ", ".join(bad)


def plain_name(name: object) -> bool:
    """Whether ``name``, read from a manifest or meta, is the name of a file directly inside an artifact's
    directory (no separator, not ``.``/``..``, not the manifest itself); the one check before a listed name is
    opened (``Cache.files`` and the verification of ``Cache.get``)."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..", MANIFEST)
        and "\0" not in name
        and "/" not in name
        and Path(name).name == name
    )


def _kind(path: Path) -> str:
    """What ``path`` is, without following a symbolic link: file, symbolic link, folder, or special file."""
    mode = path.lstat().st_mode
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISLNK(mode):
        return "symbolic link"
    return "folder" if stat.S_ISDIR(mode) else "special file"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
