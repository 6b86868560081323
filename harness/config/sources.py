"""SAE sources: where the SAE scored in a cell comes from.

``original`` (trained on M), ``retrained`` (same architecture trained on M_c), ``finetuned:<tokens>`` (the
original trained further on M_c's activations for that many tokens, ``saex.run.artifacts``), ``pruned:<entry>@<s>``
(the original SAE pruned at sparsity s by the registry's ``pruners.<entry>``, calibrated on M_c's calibration
activations) and ``loaded:[<format>:]<path>`` (an SAE from files, in a format of ``saex.sae.formats``, detected
unless named; ``<path>`` may also be ``<release>/<id>`` of the registry's ``releases``, see
``saex.config.pretrained``), which takes the place of ``original``: ``retrained``, ``finetuned`` and ``pruned`` then
derive from it.

Every source but ``loaded:`` may end in ``@seed=<n>``: n replaces the matrix seed as the initialisation seed of
the SAE trained from scratch in its lineage (``retrained@seed=1`` is initialised with seed 1;
``original@seed=1``, ``finetuned:<t>@seed=1`` and ``pruned:<e>@<s>@seed=1`` are, or start from, the original
initialised with seed 1). The data order is the ``training.seed`` of the ``saes`` entry, unchanged, so two
seeds differ only in their initialisation, as in Paulo & Belrose (arXiv 2501.16615). ``original@seed=<n>``
measures the seed-to-seed noise floor of every comparison with ``original``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Literal

from saex.sae.formats import FORMAT_NAMES

SOURCE_FORMS = (
    "original, retrained, finetuned:<tokens>, pruned:<pruners entry>@<sparsity in [0,1)>, each optionally "
    "ending in @seed=<n>; loaded:[<format>:]<path or release/id> (formats: " + ", ".join(FORMAT_NAMES) + ")"
)
_PRUNED = re.compile(r"^pruned:([A-Za-z0-9_-]+)@([0-9]*\.?[0-9]+)$")
_FINETUNED = re.compile(r"^finetuned:([0-9]+)$")
_SEED = re.compile(r"^(.+)@seed=([0-9]+)$")


@dataclass(frozen=True)
class Source:
    kind: Literal["original", "retrained", "finetuned", "pruned", "loaded"]
    pruner: str | None = None  # a name in the registry's ``pruners`` section
    sparsity: float | None = None
    path: str | None = None  # for ``loaded``: a path, or <release>/<id>
    format: str | None = None  # for ``loaded``: named in the source, else detected from the files
    tokens: int | None = None  # for ``finetuned``: training tokens on M_c
    seed: int | None = None  # initialisation seed replacing the matrix's (module doc)

    @property
    def on_base_too(self) -> bool:
        """Scored on M as well as on every M_c (the SAE does not depend on the compression)."""
        return self.kind in ("original", "loaded")

    @property
    def is_original(self) -> bool:
        """The SAE that plays ``original`` itself (the others are compared with it)."""
        return (self.kind == "original" and self.seed is None) or self.kind == "loaded"

    @property
    def seed_floor(self) -> bool:
        """An ``original@seed=<n>``: its distance to ``original`` is the seed-to-seed noise floor."""
        return self.kind == "original" and self.seed is not None


def parse_source(text: str) -> Source:
    if text.startswith("loaded:") and len(text) > len("loaded:"):
        rest = text[len("loaded:") :]
        format, _, path = rest.partition(":")
        if format in FORMAT_NAMES and path:
            return Source("loaded", path=path, format=format)
        return Source("loaded", path=rest)
    seeded = _SEED.match(text)
    if seeded:
        return replace(_unseeded(seeded.group(1), text), seed=int(seeded.group(2)))
    return _unseeded(text, text)


def _unseeded(text: str, whole: str) -> Source:
    if text in ("original", "retrained"):
        return Source(text)  # type: ignore[arg-type]
    match = _PRUNED.match(text)
    if match:
        sparsity = float(match.group(2))
        if not 0 <= sparsity < 1:
            raise ValueError(f"SAE source {whole!r}: sparsity must be in [0, 1)")
        return Source("pruned", pruner=match.group(1), sparsity=sparsity)
    match = _FINETUNED.match(text)
    if match:
        return Source("finetuned", tokens=int(match.group(1)))
    raise ValueError(f"unknown SAE source {whole!r}; valid forms: {SOURCE_FORMS}")
