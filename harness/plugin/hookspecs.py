"""Every hook a saex plugin can implement: the table of contents of the extension surface.

Plugins are modules or objects with functions decorated by ``hookimpl``. The ``register_*`` hooks receive a
``register`` callback; a plugin calls ``register(obj)`` once per component it contributes and never touches
global state. Built-in plugins (``plugins/``) are loaded through exactly the same path as third-party ones
shipped via the ``saex`` entry-point group.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from saex.config.matrix import Cell
    from saex.plugin.protocols import (
        Compressor,
        Corpus,
        Executor,
        LabelledSet,
        Layout,
        Metric,
        ModelSource,
        SAEArchitecture,
        SAEPruner,
    )
    from saex.storage.results import CellResult

PROJECT = "saex"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


def hookimpl_opts(obj: object) -> dict | None:
    """The options ``hookimpl`` attached to ``obj``, or None when it is not a hook implementation."""
    return getattr(obj, f"{PROJECT}_impl", None) if callable(obj) else None


@hookspec
def register_models(register: Callable[["ModelSource"], None]) -> None:
    """Contribute model sources (how to obtain an HF causal LM and its tokenizer). Called once at load."""


@hookspec
def register_layouts(register: Callable[[str, "Layout"], None]) -> None:
    """Contribute the layouts of model families saex does not know: ``register(model_type, Layout(...))`` with
    the ``config.model_type`` of the family. The runner attaches it to every loaded model of that type; a
    built-in family cannot be replaced. Called once at load."""


@hookspec
def register_corpora(register: Callable[["Corpus"], None]) -> None:
    """Contribute corpora (where text comes from). Called once at load."""


@hookspec
def register_labelled_sets(register: Callable[["LabelledSet"], None]) -> None:
    """Contribute labelled text sets (the concept-level evals' data: texts with one or two labels). Called once
    at load."""


@hookspec
def register_compressors(register: Callable[["Compressor"], None]) -> None:
    """Contribute compression methods (model -> compressed model, in place). Called once at load."""


@hookspec
def register_sae_architectures(register: Callable[["SAEArchitecture"], None]) -> None:
    """Contribute SAE architectures, each registered as its ``saex.SAE`` subclass (``register(TopKSAE)``), whose
    ``name`` is the ``architecture`` its saved files name. Called once at load."""


@hookspec
def register_sae_pruners(register: Callable[["SAEPruner"], None]) -> None:
    """Contribute SAE pruning strategies (used by the ``pruned:<strategy>@<s>`` SAE source)."""


@hookspec
def register_executors(register: Callable[["Executor"], None]) -> None:
    """Contribute executors: how a matrix's pending cells are computed (``local`` in this process, ``ray`` on a
    cluster); chosen with ``saex run --executor``. Called once at load."""


@hookspec
def register_metrics(register: Callable[["Metric"], None]) -> None:
    """Contribute metrics (SAE + eval activations -> flat dict of floats). Called once at load."""


@hookspec
def register_registry_files(register: Callable[[Path], None]) -> None:
    """Contribute extra registry YAML files, merged after the project's and the user's ``--registry`` files.

    A name defined in two files is an error that names both files.
    """


@hookspec
def cell_started(cell: "Cell") -> None:
    """Called when the runner starts computing a cell (not for cells skipped as already finished)."""


@hookspec
def cell_finished(cell: "Cell", result: "CellResult") -> None:
    """Called after a cell's row is written, with status ``done`` or ``failed``. May not change the result."""
