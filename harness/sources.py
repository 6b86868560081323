"""SAE sources: where the SAE scored in a cell comes from.

``original`` (trained on M), ``retrained`` (same architecture trained on M_c), ``pruned:<entry>@<s>``
(the original SAE pruned at sparsity s by the registry's ``pruners.<entry>``, calibrated on M_c's calibration
activations) and ``loaded:<path>``
(an SAE saved by saex or SAELens, used in place of training ``original``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

SOURCE_FORMS = "original, retrained, pruned:<pruners entry>@<sparsity in [0,1)>, loaded:<path>"
_PRUNED = re.compile(r"^pruned:([A-Za-z0-9_-]+)@([0-9]*\.?[0-9]+)$")


@dataclass(frozen=True)
class Source:
    kind: Literal["original", "retrained", "pruned", "loaded"]
    pruner: str | None = None  # a name in the registry's ``pruners`` section
    sparsity: float | None = None
    path: str | None = None

    @property
    def on_base_too(self) -> bool:
        """Scored on M as well as on every M_c (the SAE does not depend on the compression)."""
        return self.kind in ("original", "loaded")


def parse_source(text: str) -> Source:
    if text in ("original", "retrained"):
        return Source(text)  # type: ignore[arg-type]
    if text.startswith("loaded:") and len(text) > len("loaded:"):
        return Source("loaded", path=text[len("loaded:") :])
    match = _PRUNED.match(text)
    if match:
        sparsity = float(match.group(2))
        if not 0 <= sparsity < 1:
            raise ValueError(f"SAE source {text!r}: sparsity must be in [0, 1)")
        return Source("pruned", pruner=match.group(1), sparsity=sparsity)
    raise ValueError(f"unknown SAE source {text!r}; valid forms: {SOURCE_FORMS}")
