"""Testing plugins: run a tiny matrix with your components in a temporary folder and get its rows back, offline
and in seconds on the CPU (docs/PLUGINS.md, "Testing a plugin").

``run_tiny(tmp_path, plugins=[my_module], sections={...}, compressions=["mine"])`` runs a matrix on a tiny random
Llama over a corpus of the standard library's docstrings (``doc_corpus``), with the built-in plugins, yours, and
registry entries of your own beside the defaults of ``TINY_SECTIONS``; each keyword argument replaces a field of
the default matrix ``TINY_MATRIX``.
"""

from __future__ import annotations

import copy
import importlib
import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from saex.config.registry import load_registry
from saex.plugin.manager import load_plugins
from saex.run.runner import Runner
from saex.storage.cache import Cache
from saex.storage.results import CellResult, ResultsStore

# Modules whose docstrings are a few hundred to a few thousand characters of ASCII English prose.
DOC_MODULES = (
    "json",
    "os",
    "re",
    "collections",
    "itertools",
    "typing",
    "inspect",
    "argparse",
    "subprocess",
    "string",
    "random",
    "statistics",
    "heapq",
    "tempfile",
    "fnmatch",
    "csv",
    "pickle",
    "copy",
    "pprint",
    "time",
    "hashlib",
    "struct",
    "unittest",
    "doctest",
    "pdb",
    "optparse",
    "cmd",
    "difflib",
    "locale",
    "tokenize",
    "ast",
    "sched",
    "socket",
    "ssl",
    "uuid",
    "operator",
    "io",
    "configparser",
    "getopt",
    "gettext",
)

# The registry entries every tiny run has (yours are added beside them; a name of yours replaces the default's).
TINY_SECTIONS: dict[str, dict[str, dict]] = {
    "models": {"tiny": {"plugin": "tiny-llama", "params": {"num_hidden_layers": 2}}},
    "corpora": {"docs": {"plugin": "files", "params": {"paths": []}}},  # filled with doc_corpus's files
    "compressions": {"none": {"plugin": "none"}, "magnitude-50": {"plugin": "magnitude", "params": {"sparsity": 0.5}}},
    "saes": {
        "tiny": {
            "plugin": "topk",
            "params": {"expansion_factor": 2, "k": 8},
            "training": {"tokens": 4096, "batch_size": 256, "lr": 0.003},
        }
    },
    "metrics": {"reconstruction": {"plugin": "reconstruction"}},
}
TINY_MATRIX: dict[str, object] = {
    "models": ["tiny"],
    "corpus": "docs",
    "compressions": ["magnitude-50"],
    "hooks": ["layers.1.resid_post"],
    "saes": ["tiny"],
    "sources": ["original"],
    "metrics": ["reconstruction"],
    "tokens": {"train": 4096, "calibration": 512, "eval": 1024},
    "block_size": 64,
    "device": "cpu",
}


def module_docs() -> list[str]:
    """The docstrings of ``DOC_MODULES``: real English prose that ships with Python."""
    docs = [inspect.getdoc(importlib.import_module(name)) or "" for name in DOC_MODULES]
    assert all(len(doc) >= 300 for doc in docs), "every corpus module needs a real docstring"
    return docs


def doc_corpus(directory: Path) -> Path:
    """``directory`` with one .txt file per docstring of ``DOC_MODULES`` (40 files, ~75 kB), named so that
    sorted path order is ``DOC_MODULES`` order."""
    directory.mkdir(parents=True, exist_ok=True)
    for index, (name, doc) in enumerate(zip(DOC_MODULES, module_docs())):
        (directory / f"{index:02d}_{name}.txt").write_text(doc)
    return directory


def tiny_registry(tmp_path: Path, sections: Mapping[str, Mapping[str, dict]] | None = None, **matrix: object) -> Path:
    """A registry file in ``tmp_path``: ``TINY_SECTIONS`` with ``sections`` merged in, and the matrix ``tiny``
    (``TINY_MATRIX`` with ``matrix``'s fields replacing its own)."""
    merged = copy.deepcopy(TINY_SECTIONS)
    merged["corpora"]["docs"]["params"]["paths"] = [str(doc_corpus(tmp_path / "corpus") / "*.txt")]
    for section, entries in (sections or {}).items():
        merged.setdefault(section, {}).update(copy.deepcopy(dict(entries)))
    merged["matrices"] = {"tiny": {**TINY_MATRIX, **matrix}}
    path = tmp_path / "registry.yaml"
    path.write_text(yaml.safe_dump(merged, sort_keys=False))
    return path


def run_tiny(
    tmp_path: Path,
    *,
    plugins: Sequence[object] = (),
    sections: Mapping[str, Mapping[str, dict]] | None = None,
    **matrix: object,
) -> list[CellResult]:
    """Run the tiny matrix with the built-in plugins and ``plugins`` (modules or objects with ``@hookimpl``
    functions; installed entry points are not loaded), storing results and cache under ``tmp_path``; returns
    every cell's row. A registry error is raised as ``saex.config.registry.RegistryError``, a failed cell is a row
    whose ``status`` is ``failed`` and whose ``error`` says why."""
    loaded = load_plugins([(getattr(p, "__name__", type(p).__name__), p) for p in plugins], entry_points=False)
    registry = load_registry([tiny_registry(tmp_path, sections, **matrix)], loaded)
    store = ResultsStore(tmp_path / "results.sqlite")
    runner = Runner(loaded, registry, store, Cache(tmp_path / "cache"), progress=False, log=lambda message: None)
    return runner.run("tiny")
