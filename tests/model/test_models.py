"""Model helpers: weight fingerprints are stable, change with the weights, and the device choice."""

import pytest
import torch

from saex.model.loading import resolve_device
from saex.storage.fingerprints import directory_fingerprint


def test_directory_fingerprint_is_stable_and_tracks_weights(tmp_path, tiny_llama, monkeypatch):
    monkeypatch.setenv("SAEX_HOME", str(tmp_path / "home"))
    model_dir = tmp_path / "model"
    tiny_llama.model.save_pretrained(model_dir)
    before = sorted(p.name for p in model_dir.iterdir())
    first = directory_fingerprint(model_dir)
    assert sorted(p.name for p in model_dir.iterdir()) == before  # nothing written into the user's folder
    assert len(list((tmp_path / "home" / "fingerprints").glob("*.json"))) == 1
    assert directory_fingerprint(str(model_dir)) == first == directory_fingerprint(model_dir)
    state = {k: v.clone() for k, v in tiny_llama.model.state_dict().items()}
    state["model.norm.weight"] += 1
    from safetensors.torch import save_model

    tiny_llama.model.load_state_dict(state)
    try:
        save_model(tiny_llama.model, str(model_dir / "model.safetensors"))
        assert directory_fingerprint(model_dir) != first
    finally:
        state["model.norm.weight"] -= 1
        tiny_llama.model.load_state_dict(state)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
