"""Shared steps of model plugins: choosing the device and loading an HF directory."""

from __future__ import annotations

import torch

from saex.plugin.protocols import LoadedModel


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; anything else is passed to torch (``cpu``, ``cuda:1``)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use 'cpu' or 'auto'")
    return device


def load_hf(path_or_id: str, device: torch.device, fingerprint: str) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path_or_id)
    model = AutoModelForCausalLM.from_pretrained(path_or_id, dtype=torch.float32).to(device).eval()
    return LoadedModel(model, tokenizer, fingerprint)
