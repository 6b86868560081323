"""Any HF causal LM: a local directory or a hub id (hub ids need the weights in the local HF cache or a
network connection)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict

from saex import LoadedModel, directory_fingerprint, hookimpl, load_hf


class HuggingFace:
    name = "hf"
    description = "an HF causal LM from a local directory or a hub id"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        path: str
        revision: str | None = None

    def load(self, params: Params, device: torch.device) -> LoadedModel:
        local = Path(params.path).expanduser()
        if local.is_dir():
            return load_hf(str(local), device, directory_fingerprint(local))
        fingerprint = hashlib.sha256(f"{params.path}@{params.revision}".encode()).hexdigest()[:16]
        return load_hf(params.path, device, fingerprint)


@hookimpl
def register_models(register):
    register(HuggingFace())
