"""Model helpers: weight fingerprints are stable, change with the weights, and the device choice."""

import pytest
import torch

from saex.models import directory_fingerprint, resolve_device


def test_directory_fingerprint_is_stable_and_tracks_weights(tmp_path, tiny_llama):
    tiny_llama.model.save_pretrained(tmp_path)
    first = directory_fingerprint(tmp_path)
    assert (tmp_path / ".saex-fingerprint.json").exists()
    assert directory_fingerprint(tmp_path) == first == directory_fingerprint(tmp_path)
    state = {k: v.clone() for k, v in tiny_llama.model.state_dict().items()}
    state["model.norm.weight"] += 1
    from safetensors.torch import save_model

    tiny_llama.model.load_state_dict(state)
    try:
        save_model(tiny_llama.model, str(tmp_path / "model.safetensors"))
        assert directory_fingerprint(tmp_path) != first
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
