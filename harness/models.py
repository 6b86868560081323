"""Shared steps of model plugins: device choice, loading an HF directory, weight fingerprints."""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import torch

from saex.protocols import LoadedModel


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; anything else is passed to torch (``cpu``, ``cuda:1``)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use 'cpu' or 'auto'")
    return device


def file_digest(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def directory_fingerprint(directory: Path) -> str:
    """Hash of a model directory's weight and config files (``.pt`` too: hqq saves ``qmodel.pt``), cached beside
    them, keyed by size and mtime."""
    files = sorted(
        p
        for p in directory.iterdir()
        if p.suffix in {".safetensors", ".bin", ".pt", ".json"} and p.is_file() and not p.name.startswith(".")
    )
    parts = []
    for p in files:
        stat = p.stat()
        parts.append(f"{p.name}:{stat.st_size}:{stat.st_mtime_ns}")
    stamp = hashlib.sha256("|".join(parts).encode()).hexdigest()
    cache = directory / ".saex-fingerprint.json"
    if cache.exists():
        saved = json.loads(cache.read_text())
        if saved.get("stamp") == stamp:
            return saved["fingerprint"]
    fingerprint = hashlib.sha256("|".join(f"{p.name}:{file_digest(p)}" for p in files).encode()).hexdigest()[:16]
    with contextlib.suppress(OSError):  # read-only model directory: fingerprint again next time
        cache.write_text(json.dumps({"stamp": stamp, "fingerprint": fingerprint}))
    return fingerprint


def load_hf(path_or_id: str, device: torch.device, fingerprint: str) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path_or_id)
    model = AutoModelForCausalLM.from_pretrained(path_or_id, dtype=torch.float32).to(device).eval()
    return LoadedModel(model, tokenizer, fingerprint)
