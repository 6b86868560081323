"""Activation sources (in memory and sharded on disk) and the cached collection pass over a model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import saex.model.activations
from saex.data.corpus import pack, special_mask
from saex.model.activations import ShardedActivations, TensorActivations, collect_activations
from saex.model.hookpoints import HookPoint, capture
from saex.plugin.protocols import LoadedModel
from saex.plugins.corpora.files import LocalFiles
from saex.storage.cache import Cache

pytestmark = pytest.mark.usefixtures("single_thread")

CPU = torch.device("cpu")
N, D = 103, 3
SHARD_ROWS = (40, 17, 46)


def rows_with_ids(n: int = N, d: int = D) -> torch.Tensor:
    """Row i is [i, i + 0.25, i + 0.5, ...]: column 0 identifies the row."""
    return torch.arange(n, dtype=torch.float32)[:, None] + 0.25 * torch.arange(d, dtype=torch.float32)


def sharded(tmp_path: Path, x: torch.Tensor, sizes: tuple[int, ...] = SHARD_ROWS) -> ShardedActivations:
    names, start = [], 0
    for i, size in enumerate(sizes):
        names.append(f"shard_{i:05d}.safetensors")
        save_file({"x": x[start : start + size].contiguous()}, tmp_path / names[-1])
        start += size
    assert start == len(x)
    return ShardedActivations(tmp_path, {"n_tokens": len(x), "d_in": x.shape[1], "shards": names})


@pytest.fixture(params=["tensor", "sharded"])
def source(request: pytest.FixtureRequest, tmp_path: Path) -> TensorActivations | ShardedActivations:
    x = rows_with_ids()
    return TensorActivations(x) if request.param == "tensor" else sharded(tmp_path, x)


def ids_of(batches: list[torch.Tensor]) -> list[int]:
    return torch.cat(batches)[:, 0].long().tolist()


@pytest.mark.parametrize("batch_size", [1, 10, 64, 103, 500])
def test_unshuffled_batches_are_all_rows_in_order(
    source: TensorActivations | ShardedActivations, batch_size: int
) -> None:
    assert (source.n_tokens, source.d_in) == (N, D)
    batches = list(source.iter_batches(batch_size))
    assert torch.equal(torch.cat(batches), rows_with_ids())
    full, last = divmod(N, batch_size)
    assert [len(b) for b in batches] == [batch_size] * full + ([last] if last else [])


@pytest.mark.parametrize("batch_size", [7, 16, 64])
def test_shuffled_batches_hold_every_row_once(source: TensorActivations | ShardedActivations, batch_size: int) -> None:
    batches = list(source.iter_batches(batch_size, shuffle=True, seed=3))
    order = ids_of(batches)
    assert sorted(order) == list(range(N))
    assert order != list(range(N))
    rows = torch.cat(batches)
    assert torch.equal(rows, rows_with_ids()[torch.tensor(order)])  # rows are whole, not mixed across columns
    full, last = divmod(N, batch_size)
    assert [len(b) for b in batches] == [batch_size] * full + ([last] if last else [])


def test_shuffle_seed_determines_order(source: TensorActivations | ShardedActivations) -> None:
    orders = {seed: ids_of(list(source.iter_batches(16, shuffle=True, seed=seed))) for seed in (0, 1, 2)}
    assert ids_of(list(source.iter_batches(16, shuffle=True, seed=1))) == orders[1]
    assert orders[0] != orders[1] != orders[2] != orders[0]


def test_sharded_shuffle_permutes_across_shards(tmp_path: Path) -> None:
    """Not just rows within each shard: the shard order changes too, so row 0 is not always in the first shard."""
    source = sharded(tmp_path, rows_with_ids())
    first_shard_of = set()
    for seed in range(8):
        order = ids_of(list(source.iter_batches(10, shuffle=True, seed=seed)))
        first_shard_of.add(0 if order[0] < 40 else 1 if order[0] < 57 else 2)
    assert len(first_shard_of) > 1


def test_tensor_activations_rejects_other_shapes() -> None:
    with pytest.raises(ValueError, match=r"\[n_tokens, d_in\], got shape \(2, 3, 4\)"):
        TensorActivations(torch.zeros(2, 3, 4))


# --- collect_activations -------------------------------------------------------------------------------------

HOOKS = [HookPoint(1, "resid_post"), HookPoint(0, "mlp_out"), HookPoint(2, "resid_pre")]
KEY_PARTS = {"model": "tiny-llama-test", "compression": "none", "tokens": 7 * 32, "dtype": "float32"}


@pytest.fixture
def blocks(text_corpus: Path, tiny_llama: LoadedModel) -> torch.Tensor:
    """7 train blocks of 32 tokens from the corpus (all from its first document), with a run of PAD tokens and a
    document-separating EOS placed in the middle of blocks."""
    docs = LocalFiles().documents(LocalFiles.Params(paths=[str(text_corpus / "*.txt")]))
    train = pack(docs, tiny_llama.tokenizer, 32, {"train": 7, "calibration": 1, "eval": 1})["train"].clone()
    train[3, 10:14] = tiny_llama.tokenizer.pad_token_id
    train[5, 20] = tiny_llama.tokenizer.eos_token_id
    return train


def collect(
    cache: Cache,
    lm: LoadedModel,
    blocks: torch.Tensor,
    hooks: list[HookPoint] = HOOKS,
    key_parts: dict = KEY_PARTS,
    **kwargs: int,
) -> dict[HookPoint, ShardedActivations]:
    return collect_activations(
        cache, lm.model, lm.tokenizer, blocks, hooks, key_parts, device=CPU, batch_blocks=3, progress=False, **kwargs
    )


def read_all(source: ShardedActivations) -> torch.Tensor:
    return torch.cat(list(source.iter_batches(1000)))


def test_collected_activations_equal_capture_at_non_special_tokens(
    tmp_path: Path, tiny_llama: LoadedModel, blocks: torch.Tensor
) -> None:
    keep = ~special_mask(blocks, tiny_llama.tokenizer)
    n_special = 7 + 4 + 1  # BOS per block, PADs, EOS
    assert int(keep.sum()) == blocks.numel() - n_special

    got = collect(Cache(tmp_path), tiny_llama, blocks)
    want = capture(tiny_llama.model, blocks, HOOKS, stop_early=False)
    assert list(got) == HOOKS
    for hook in HOOKS:
        assert (got[hook].n_tokens, got[hook].d_in) == (int(keep.sum()), 64)
        torch.testing.assert_close(read_all(got[hook]), want[hook][keep])
    assert len({got[h].path for h in HOOKS}) == len(HOOKS)
    assert not [p for p in (tmp_path / "activations").iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_second_collection_reads_the_cache_without_running_the_model(
    tmp_path: Path, tiny_llama: LoadedModel, blocks: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = Cache(tmp_path)
    first = collect(cache, tiny_llama, blocks)

    def no_capture(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model ran although every hook was cached")

    monkeypatch.setattr(saex.model.activations, "capture", no_capture)
    second = collect(cache, tiny_llama, blocks)
    for hook in HOOKS:
        assert second[hook].path == first[hook].path
        assert torch.equal(read_all(second[hook]), read_all(first[hook]))


def test_only_uncached_hooks_are_collected(
    tmp_path: Path, tiny_llama: LoadedModel, blocks: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = Cache(tmp_path)
    first = collect(cache, tiny_llama, blocks, hooks=HOOKS[:1])
    asked: list[list[HookPoint]] = []

    def recording_capture(model, ids, hooks, **kwargs):
        asked.append(list(hooks))
        return capture(model, ids, hooks, **kwargs)

    monkeypatch.setattr(saex.model.activations, "capture", recording_capture)
    both = collect(cache, tiny_llama, blocks, hooks=HOOKS[:2])
    assert asked == [[HOOKS[1]]] * 3  # 7 blocks in batches of 3
    assert both[HOOKS[0]].path == first[HOOKS[0]].path


def test_key_parts_change_gives_a_new_directory(tmp_path: Path, tiny_llama: LoadedModel, blocks: torch.Tensor) -> None:
    cache = Cache(tmp_path)
    base = collect(cache, tiny_llama, blocks, hooks=HOOKS[:1])[HOOKS[0]].path
    other = collect(cache, tiny_llama, blocks, hooks=HOOKS[:1], key_parts={**KEY_PARTS, "compression": "magnitude-0.5"})
    assert other[HOOKS[0]].path != base
    assert sorted(p.name for p in (tmp_path / "activations").iterdir()) == sorted(
        [base.name, other[HOOKS[0]].path.name]
    )


def test_small_shards_read_back_the_same_rows(tmp_path: Path, tiny_llama: LoadedModel, blocks: torch.Tensor) -> None:
    one = collect(Cache(tmp_path / "a"), tiny_llama, blocks, hooks=HOOKS[:1])[HOOKS[0]]
    many = collect(Cache(tmp_path / "b"), tiny_llama, blocks, hooks=HOOKS[:1], shard_tokens=50)[HOOKS[0]]
    assert len(one.shards) == 1
    assert len(many.shards) >= 3
    assert many.n_tokens == one.n_tokens
    assert sorted(p.name for p in many.path.iterdir()) == sorted([*(s.name for s in many.shards), "manifest.json"])
    assert torch.equal(read_all(many), read_all(one))
    shuffled = torch.cat(list(many.iter_batches(37, shuffle=True, seed=5)))
    assert torch.equal(shuffled[shuffled[:, 0].argsort()], read_all(one)[read_all(one)[:, 0].argsort()])


def test_nan_activations_are_refused_and_never_cached(tmp_path: Path, tiny_llama: LoadedModel, blocks: torch.Tensor):
    import copy

    broken = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        broken.model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    cache = Cache(tmp_path)
    with pytest.raises(saex.model.activations.NonFiniteActivations, match=r"NaN/Inf activations at \d+ of \d+ tokens"):
        collect(cache, broken, blocks)
    assert [p for p in (tmp_path / "activations").iterdir() if not p.name.startswith(".tmp-")] == []
