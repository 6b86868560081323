"""Built-in SAE pruning strategies (the ``pruned:<strategy>@<s>`` SAE source), one module each:
``magnitude`` and ``wanda`` (unstructured, per output column of W_enc and W_dec) and ``latents`` (structured:
whole latents dropped, d_sae shrinks). ``common`` holds what they share, including ``sae_sparsity``, the
achieved-sparsity measurement. See docs/PRUNING.md.

The package is one plugin (short name ``pruning``), not three: a built-in plugin is named after its module,
and ``magnitude`` / ``wanda`` are already the names of compression plugins.
"""

from __future__ import annotations

from typing import Callable

from harness.protocols import SAEPruner
from harness.spec import hookimpl
from plugins.pruning.latents import LatentsPruner
from plugins.pruning.magnitude import MagnitudePruner
from plugins.pruning.wanda import WandaPruner

__all__ = ["LatentsPruner", "MagnitudePruner", "WandaPruner"]


@hookimpl
def register_sae_pruners(register: Callable[[SAEPruner], None]) -> None:
    register(MagnitudePruner())
    register(WandaPruner())
    register(LatentsPruner())
