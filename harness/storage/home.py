"""The saex home folder: ``$SAEX_HOME``, default ``~/.cache/saex``. It holds the cache, the embedded assets and the
fingerprints of users' model folders (saex never writes into a user's folder)."""

from __future__ import annotations

import os
from pathlib import Path


def saex_home() -> Path:
    return Path(os.environ.get("SAEX_HOME", Path.home() / ".cache" / "saex"))
