"""Shared fixtures: a tiny random Llama, a small corpus of real English text, one-thread torch; and the registry
sections of the tests that run a matrix on a 3-layer tiny Llama."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from saex.plugin.protocols import LoadedModel
from saex.plugins.models.tiny_llama import TinyLlama
from saex.testing import doc_corpus


def _one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def single_thread(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test but the integration ones runs torch on one thread: tiny matmuls gain nothing from threads,
    and on a busy CPU torch's spinning threads make them many times slower."""
    if request.node.get_closest_marker("integration"):
        yield
        return
    yield from _one_torch_thread()


@pytest.fixture(scope="module")
def single_thread_module() -> Iterator[None]:
    """One torch thread for a module's own module-scoped fixtures (which ``single_thread`` does not cover):
    ``pytestmark = pytest.mark.usefixtures("single_thread_module")``."""
    yield from _one_torch_thread()


@pytest.fixture(scope="session")
def tiny_llama() -> LoadedModel:
    """A 4-layer random Llama (d=64, byte tokenizer: <s>=0, </s>=1, <pad>=2). Shared: tests must leave no hooks."""
    return TinyLlama().load(TinyLlama.Params(num_hidden_layers=4), torch.device("cpu"))


@pytest.fixture
def text_corpus(tmp_path: Path) -> Path:
    """A directory with one .txt file per stdlib module docstring (40 files, ~75 kB), named so that sorted path
    order is ``DOC_MODULES`` order."""
    return doc_corpus(tmp_path / "corpus")


@pytest.fixture
def install_distribution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Install a throwaway distribution: ``install(module_file, dist_name, entry_point_name)`` copies the
    module next to a ``<dist>-0.1.dist-info`` with one entry point in the ``saex`` group, on sys.path."""

    def install(module_file: Path, dist: str, entry_point: str) -> Path:
        site = tmp_path / "site"
        site.mkdir(exist_ok=True)
        shutil.copy(module_file, site / module_file.name)
        info = site / f"{dist.replace('-', '_')}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(f"[saex]\n{entry_point} = {module_file.stem}\n")
        monkeypatch.syspath_prepend(str(site))
        return site

    return install


def tiny3_sections(text_corpus: Path, training_tokens: int) -> dict:
    """Registry sections shared by the tests that run a matrix on a 3-layer tiny Llama ("tiny3") over
    ``text_corpus`` ("docs"): magnitude 50% ("mag") and a TopK SAE with 16 latents, k 8 ("small")."""
    return {
        "models": {"tiny3": {"plugin": "tiny-llama", "params": {"num_hidden_layers": 3}}},
        "corpora": {"docs": {"plugin": "files", "params": {"paths": [str(text_corpus / "*.txt")]}}},
        "compressions": {"mag": {"plugin": "magnitude", "params": {"sparsity": 0.5}}},
        "saes": {
            "small": {
                "plugin": "topk",
                "params": {"expansion_factor": 2, "k": 8},
                "training": {"tokens": training_tokens, "batch_size": 256, "lr": 0.003},
            }
        },
    }


def tiny3_matrix(**fields: object) -> dict:
    """A matrix over ``tiny3_sections``: magnitude 50%, layer 1's residual stream, the "small" SAE, blocks of 64
    tokens on the CPU; ``fields`` add to it or replace its fields."""
    return {
        "models": ["tiny3"],
        "corpus": "docs",
        "compressions": ["mag"],
        "hooks": ["layers.1.resid_post"],
        "saes": ["small"],
        "block_size": 64,
        "device": "cpu",
        **fields,
    }
