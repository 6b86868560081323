"""Content-addressed artifact cache: a directory per (kind, key), written atomically with a manifest of file
hashes that is checked before every reuse. A key is the hash of everything that determines the artifact."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from saex.models import file_digest

MANIFEST = "manifest.json"


def cache_key(parts: dict[str, Any]) -> str:
    """Stable hash of a JSON-able description of an artifact's inputs."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


class Cache:
    def __init__(self, root: Path):
        self.root = Path(root)

    def dir(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def get(self, kind: str, key: str) -> Path | None:
        """The artifact's directory if present and intact; a corrupt one is moved aside and reported."""
        path = self.dir(kind, key)
        manifest = path / MANIFEST
        if not manifest.exists():
            return None
        try:
            files = dict(json.loads(manifest.read_text())["files"])
            bad = [n for n, digest in files.items() if not (path / n).exists() or file_digest(path / n) != digest]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            bad = [MANIFEST]
        if bad:
            aside = path.with_name(f"{key}.corrupt-{time.time_ns()}-{os.getpid()}")
            os.replace(path, aside)
            print(
                f"saex: cached {kind}/{key} failed verification ({', '.join(bad)}); moved to {aside}", file=sys.stderr
            )
            return None
        return path

    def meta(self, kind: str, key: str) -> dict[str, Any]:
        return json.loads((self.dir(kind, key) / MANIFEST).read_text())["meta"]

    def put(self, kind: str, key: str, write: Callable[[Path], dict[str, Any]]) -> Path:
        """Run ``write(tmpdir) -> meta`` and publish the directory under the key with its manifest."""
        final = self.dir(kind, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=final.parent))
        try:
            meta = write(tmp)
            files = {p.name: file_digest(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            (tmp / MANIFEST).write_text(json.dumps({"key": key, "meta": meta, "files": files}, indent=1, default=str))
            if final.exists():  # another process finished first: keep theirs
                shutil.rmtree(tmp)
            else:
                os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final
