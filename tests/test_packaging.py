"""What `pip install .` puts into site-packages: one namespace, `saex`, with every package of the tree."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_every_package_folder_is_installed_under_saex():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"] == {"saex": "harness", "saex.plugins": "plugins"}
    found = set()
    for top, name in (("harness", "saex"), ("plugins", "saex.plugins")):
        for init in (ROOT / top).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / top).parts
            found.add(".".join((name, *parts)))
    assert set(config["packages"]) == found
    assert all(p == "saex" or p.startswith("saex.") for p in config["packages"])
