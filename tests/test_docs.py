"""The docs stay true to the tree: every repository path a doc or the README names exists, and
docs/ARCHITECTURE.md lists every spine module."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# a path into one of the repository's top-level folders, e.g. `saex.run.runner`, docs/SAE.md, tests/fixtures/x.py
PATH = re.compile(r"(?<![\w./-])((?:harness|plugins|tests|benchmarks|docs|\.ci)/[\w./-]*\w)")


def test_every_path_a_doc_names_exists():
    missing = []
    for doc in DOCS:
        for match in PATH.finditer(doc.read_text()):
            path = match.group(1)
            if "*" in path or "<" in path:
                continue
            if not (ROOT / path).exists():
                missing.append(f"{doc.relative_to(ROOT)}: {path}")
    assert missing == []


def test_architecture_lists_every_spine_module():
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    spine = ROOT / "harness"
    modules = sorted(
        ".".join(("saex", *p.relative_to(spine).with_suffix("").parts))
        for p in spine.rglob("*.py")
        if p.name != "__init__.py"
    )
    assert [m for m in modules if f"`{m}`" not in text] == []
