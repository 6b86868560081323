"""SAE sources: where the SAE scored in a cell comes from.

``original`` (trained on M), ``retrained`` (same architecture trained on M_c), ``pruned:<entry>@<s>``
(the original SAE pruned at sparsity s by the registry's ``pruners.<entry>``, calibrated on M_c's calibration
activations) and ``loaded:[<format>:]<path>`` (an SAE from files, in a format of ``saex.sae_formats``, detected
unless named; ``<path>`` may also be ``<release>/<id>`` of the registry's ``releases``, see
``saex.pretrained``), which takes the place of ``original``: ``retrained`` and ``pruned`` then derive from it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from saex.sae_formats import FORMAT_NAMES

SOURCE_FORMS = (
    "original, retrained, pruned:<pruners entry>@<sparsity in [0,1)>, "
    "loaded:[<format>:]<path or release/id> (formats: " + ", ".join(FORMAT_NAMES) + ")"
)
_PRUNED = re.compile(r"^pruned:([A-Za-z0-9_-]+)@([0-9]*\.?[0-9]+)$")


@dataclass(frozen=True)
class Source:
    kind: Literal["original", "retrained", "pruned", "loaded"]
    pruner: str | None = None  # a name in the registry's ``pruners`` section
    sparsity: float | None = None
    path: str | None = None  # for ``loaded``: a path, or <release>/<id>
    format: str | None = None  # for ``loaded``: named in the source, else detected from the files

    @property
    def on_base_too(self) -> bool:
        """Scored on M as well as on every M_c (the SAE does not depend on the compression)."""
        return self.kind in ("original", "loaded")


def parse_source(text: str) -> Source:
    if text in ("original", "retrained"):
        return Source(text)  # type: ignore[arg-type]
    if text.startswith("loaded:") and len(text) > len("loaded:"):
        rest = text[len("loaded:") :]
        format, _, path = rest.partition(":")
        if format in FORMAT_NAMES and path:
            return Source("loaded", path=path, format=format)
        return Source("loaded", path=rest)
    match = _PRUNED.match(text)
    if match:
        sparsity = float(match.group(2))
        if not 0 <= sparsity < 1:
            raise ValueError(f"SAE source {text!r}: sparsity must be in [0, 1)")
        return Source("pruned", pruner=match.group(1), sparsity=sparsity)
    raise ValueError(f"unknown SAE source {text!r}; valid forms: {SOURCE_FORMS}")
