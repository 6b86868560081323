"""Content fingerprints: a file's digest and a model directory's fingerprint (cached in the saex cache, never in the
user's folder)."""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

from saex.storage.home import saex_home


def file_digest(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def directory_fingerprint(directory: str | Path) -> str:
    """Hash of a model directory's weight and config files (``.pt`` too: hqq saves ``qmodel.pt``). Hashing is
    skipped while no file's size or mtime changed: the last result is kept in the saex home
    (``fingerprints/<hash of the absolute path>.json``), never in the user's folder."""
    directory = Path(directory).resolve()
    if not directory.is_dir():
        raise NotADirectoryError(f"{directory} is not a directory")
    files = sorted(
        p
        for p in directory.iterdir()
        if p.suffix in {".safetensors", ".bin", ".pt", ".json"} and p.is_file() and not p.name.startswith(".")
    )
    parts = []
    for p in files:
        stat = p.stat()
        parts.append(f"{p.name}:{stat.st_size}:{stat.st_mtime_ns}")
    stamp = hashlib.sha256("|".join(parts).encode()).hexdigest()
    memo = saex_home() / "fingerprints" / (hashlib.sha256(str(directory).encode()).hexdigest()[:32] + ".json")
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        saved = json.loads(memo.read_text())
        if saved["stamp"] == stamp and saved["directory"] == str(directory):
            return str(saved["fingerprint"])
    fingerprint = hashlib.sha256("|".join(f"{p.name}:{file_digest(p)}" for p in files).encode()).hexdigest()[:16]
    with contextlib.suppress(OSError):  # a read-only saex home: fingerprint again next time
        memo.parent.mkdir(parents=True, exist_ok=True)
        memo.write_text(json.dumps({"directory": str(directory), "stamp": stamp, "fingerprint": fingerprint}))
    return fingerprint
