"""The SAE trainer: token budget and epochs, schedule, divergence detection, determinism."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from saex.model.activations import TensorActivations
from saex.plugins.sae.topk import TopKSAE
from saex.sae.training import CheckpointMismatch, TrainingConfig, TrainingDiverged, lr_factor, train_sae

CPU = torch.device("cpu")


def build(**params: object) -> TopKSAE:
    arch = TopKSAE
    return arch.build(16, arch.Params(**({"d_sae": 64, "k": 4} | params)), seed=0)


def data(n: int = 1000) -> torch.Tensor:
    return torch.randn(n, 16, generator=torch.Generator().manual_seed(0)).relu()


class NaNAtBatch:
    """An ActivationSource whose batch number ``bad`` (counting across epochs) holds a NaN."""

    def __init__(self, x: torch.Tensor, bad: int):
        self.inner, self.bad, self.count = TensorActivations(x), bad, 0
        self.n_tokens, self.d_in = self.inner.n_tokens, self.inner.d_in

    def iter_batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0) -> Iterator[torch.Tensor]:
        for batch in self.inner.iter_batches(batch_size, shuffle=shuffle, seed=seed):
            if self.count == self.bad:
                batch = batch.clone()
                batch[0, 0] = float("nan")
            self.count += 1
            yield batch


def test_training_uses_exact_token_budget_over_repeated_epochs():
    result = train_sae(
        build(), TensorActivations(data(1000)), TrainingConfig(tokens=2500, batch_size=300), device=CPU, progress=False
    )
    assert result.tokens == 2500
    assert result.steps == 10  # 300+300+300+100 twice, then 300+200
    assert set(result.final) == {"loss", "l0", "explained_variance", "dead_frac"}
    assert result.final["l0"] <= 4


def test_same_seed_gives_bit_identical_weights():
    cfg = TrainingConfig(tokens=5000, batch_size=128, seed=3)
    runs = [build() for _ in range(2)]
    for sae in runs:
        train_sae(sae, TensorActivations(data()), cfg, device=CPU, progress=False)
    for name, tensor in runs[0].state_dict().items():
        assert torch.equal(tensor, runs[1].state_dict()[name]), name


def test_different_seed_changes_weights():
    saes = [build(), build()]
    for seed, sae in enumerate(saes):
        train_sae(
            sae,
            TensorActivations(data()),
            TrainingConfig(tokens=2000, batch_size=128, seed=seed),
            device=CPU,
            progress=False,
        )
    assert not torch.equal(saes[0].W_dec, saes[1].W_dec)


def test_nan_in_activations_raises_diverged_naming_the_step():
    source = NaNAtBatch(data(), bad=3)
    sae = build(normalize_input=False, b_dec_init="zero")  # no data-dependent init reads the bad batch
    with pytest.raises(TrainingDiverged, match="at step 3 .*lower lr"):
        train_sae(sae, source, TrainingConfig(tokens=2000, batch_size=100), device=CPU, progress=False)


def test_huge_learning_rate_raises_diverged():
    with pytest.raises(TrainingDiverged, match="step"):
        train_sae(
            build(),
            TensorActivations(data()),
            TrainingConfig(tokens=5000, batch_size=100, lr=1e30),
            device=CPU,
            progress=False,
        )


def test_lr_schedule_warms_up_holds_and_decays_to_zero():
    cfg = TrainingConfig(warmup_frac=0.1, decay_frac=0.2)
    assert lr_factor(0.05, cfg) == pytest.approx(0.5)
    assert lr_factor(0.5, cfg) == 1.0
    assert lr_factor(0.9, cfg) == pytest.approx(0.5)
    assert lr_factor(1.0, cfg) == 0.0


def test_training_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="epochs"):
        TrainingConfig(epochs=3)


class Interrupted(Exception):
    pass


class InterruptAtBatch:
    """An ActivationSource that raises ``Interrupted`` when batch number ``at`` (across epochs) is requested."""

    def __init__(self, x: torch.Tensor, at: int):
        self.inner, self.at, self.count = TensorActivations(x), at, 0
        self.n_tokens, self.d_in = self.inner.n_tokens, self.inner.d_in

    def iter_batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0) -> Iterator[torch.Tensor]:
        for batch in self.inner.iter_batches(batch_size, shuffle=shuffle, seed=seed):
            if self.count == self.at:
                raise Interrupted
            self.count += 1
            yield batch


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    state_b = b.state_dict()
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor, state_b[name]), name


def test_resumed_training_ends_with_the_same_weights_as_an_uninterrupted_run(tmp_path):
    cfg = TrainingConfig(tokens=3000, batch_size=128, seed=1)  # 1000 tokens: epochs of 7 + 1 short batch
    reference = build()
    expected = train_sae(reference, TensorActivations(data()), cfg, device=CPU, progress=False)
    # batch 0 is the data-dependent init's read; batch 13 is training step 12, in the second epoch
    with pytest.raises(Interrupted):
        train_sae(
            build(),
            InterruptAtBatch(data(), at=13),
            cfg,
            device=CPU,
            progress=False,
            checkpoint_dir=tmp_path,
            checkpoint_every=500,
        )
    assert (tmp_path / "checkpoint.safetensors").is_file()
    resumed = build()
    result = train_sae(
        resumed,
        TensorActivations(data()),
        cfg,
        device=CPU,
        progress=False,
        checkpoint_dir=tmp_path,
        checkpoint_every=500,
    )
    assert_same_state(reference, resumed)
    assert (result.tokens, result.steps) == (expected.tokens, expected.steps)
    assert result.final == expected.final
    assert (tmp_path / "checkpoint.safetensors").exists()  # kept until the caller has stored the SAE


def test_checkpoint_of_another_run_is_refused(tmp_path):
    with pytest.raises(Interrupted):
        train_sae(
            build(),
            InterruptAtBatch(data(), at=10),
            TrainingConfig(tokens=3000, batch_size=128),
            device=CPU,
            progress=False,
            checkpoint_dir=tmp_path,
            checkpoint_every=256,
        )
    with pytest.raises(CheckpointMismatch, match=r"checkpoint\.safetensors: checkpoint of another run"):
        train_sae(
            build(),
            TensorActivations(data()),
            TrainingConfig(tokens=3000, batch_size=128, lr=1e-4),
            device=CPU,
            progress=False,
            checkpoint_dir=tmp_path,
        )


def test_a_damaged_or_planted_checkpoint_is_never_executed_and_training_starts_afresh(tmp_path, capsys):
    """Checkpoints are safetensors + JSON: a pickle planted under the old name is ignored, a garbage file under
    the current name is moved aside (named), and the run equals an uninterrupted one."""
    import pickle

    class Payload:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "payload-ran",))

    (tmp_path / "checkpoint.pt").write_bytes(pickle.dumps(Payload()))
    (tmp_path / "checkpoint.safetensors").write_bytes(pickle.dumps(Payload()))
    cfg = TrainingConfig(tokens=1000, batch_size=128, seed=1)
    reference, planted = build(), build()
    train_sae(reference, TensorActivations(data()), cfg, device=CPU, progress=False)
    train_sae(planted, TensorActivations(data()), cfg, device=CPU, progress=False, checkpoint_dir=tmp_path)
    assert not (tmp_path / "payload-ran").exists()
    assert_same_state(reference, planted)
    assert "checkpoint.safetensors unreadable" in capsys.readouterr().err
    assert any(p.name.startswith("checkpoint.safetensors.unreadable-") for p in tmp_path.iterdir())


def test_bf16_autocast_keeps_metrics_within_one_percent_of_fp32():
    x = planted_mix()
    results = {}
    for precision in ("float32", "bfloat16"):
        sae = build()
        cfg = TrainingConfig(tokens=20_000, batch_size=256, lr=3e-3, precision=precision)
        train_sae(sae, TensorActivations(x), cfg, device=CPU, progress=False)
        assert sae.W_dec.dtype == torch.float32  # parameters stay float32
        with torch.no_grad():
            x_hat, _ = sae(x)
        results[precision] = (1 - (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
    assert results["float32"] > 0.8
    assert results["bfloat16"] == pytest.approx(results["float32"], rel=0.01)


def planted_mix(n: int = 4000) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    dictionary = torch.nn.functional.normalize(torch.randn(32, 16, generator=g), dim=-1)
    which = torch.rand(n, 32, generator=g).argsort(-1)[:, :3]
    return torch.zeros(n, 32).scatter_(-1, which, torch.rand(n, 3, generator=g) + 0.5) @ dictionary


def test_a_runaway_learning_rate_stops_training_with_a_clear_error():
    """lr 1e6 keeps the loss finite but makes the reconstruction useless (explained variance ~ -1e11): stopped
    like a NaN, never stored."""
    with pytest.raises(TrainingDiverged, match=r"explained variance -\S+ over the last 20 steps"):
        train_sae(
            build(),
            TensorActivations(data()),
            TrainingConfig(tokens=8000, batch_size=64, lr=1e6),
            device=CPU,
            progress=False,
        )
