"""Splicing: one prefix pass, one suffix pass per variant, equal to a full forward; CE/KL scores on
constructed SAEs (perfect -> 1, zero -> 0)."""

import copy
import math

import pytest
import torch
from torch import nn

from saex.data.corpus import special_mask
from saex.model.hookpoints import HOOK_SITES, HookPoint, spliced
from saex.model.language_model import next_token_loss
from saex.model.splice import Prefixes, prefix, suffix_logits
from saex.plugins.metrics.downstream import CEKL, DIFFERENCES
from saex.sae.splice_context import SpliceContext


class Identity(nn.Module):
    d_sae = 1

    def forward(self, x):
        return x, x


class Zero(nn.Module):
    d_sae = 1

    def forward(self, x):
        return torch.zeros_like(x), x


class Scaled(nn.Module):
    d_sae = 1

    def forward(self, x):
        return 0.5 * x, x


@pytest.fixture
def blocks(tiny_llama):
    torch.manual_seed(0)
    ids = torch.randint(3, len(tiny_llama.tokenizer), (4, 24))
    ids[:, 0] = tiny_llama.tokenizer.bos_token_id
    ids[2, 10] = tiny_llama.tokenizer.eos_token_id
    return ids


@pytest.mark.parametrize("site", HOOK_SITES)
@pytest.mark.parametrize("layer", [0, 2])
def test_suffix_equals_full_forward(tiny_llama, blocks, site, layer, single_thread):
    model = tiny_llama.model
    hook = HookPoint(layer, site)
    with torch.no_grad():
        full = model(input_ids=blocks).logits
        double = lambda x: 2 * x
        mask = ~special_mask(blocks, tiny_llama.tokenizer)
        with spliced(model, hook, double, mask):
            full_spliced = model(input_ids=blocks).logits
    hidden = prefix(model, blocks, hook)
    torch.testing.assert_close(suffix_logits(model, hidden, hook, None, None), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(suffix_logits(model, hidden, hook, double, mask), full_spliced, atol=1e-5, rtol=1e-5)
    assert len(model.model.layers) == 4  # the full layer list is restored


HOOK = HookPoint(1, "resid_post")


def score(tiny_llama, blocks, saes, hook=HOOK, ablate_at="all"):
    ctx = SpliceContext(tiny_llama.model, hook, blocks, tiny_llama.tokenizer, torch.device("cpu"), saes)
    return CEKL().compute_spliced(ctx, CEKL.Params(max_tokens=10_000, batch_blocks=3, ablate_at=ablate_at))


@pytest.mark.parametrize("site", HOOK_SITES)
def test_perfect_sae_scores_one_and_zero_sae_scores_zero(tiny_llama, blocks, site, single_thread):
    found = score(
        tiny_llama,
        blocks,
        {"perfect": Identity(), "zero": Zero(), "half": Scaled()},
        HookPoint(1, site),
        ablate_at="sae",
    )
    perfect, zero, half = found["perfect"], found["zero"], found["half"]
    assert perfect["ce_loss_score"] == pytest.approx(1, abs=1e-5)
    assert perfect["kl_sae"] == pytest.approx(0, abs=1e-6) and perfect["kl_div_score"] == pytest.approx(1, abs=1e-5)
    assert zero["ce_loss_score"] == pytest.approx(0, abs=1e-6) and zero["kl_div_score"] == pytest.approx(0, abs=1e-6)
    assert half["kl_sae"] > 0
    assert perfect["ce_clean"] == zero["ce_clean"] == half["ce_clean"]
    assert perfect["ce_tokens"] == 4 * 22 - 1  # predictions from BOS (one per block) and the EOS dropped
    assert perfect["kl_tokens"] == 4 * 23 - 1  # KL also at each block's last position, which has no target


def test_default_ablation_zeroes_every_position_including_special_tokens(tiny_llama, blocks):
    """SAELens ablates everywhere: a zero SAE (non-special positions only) then differs from the ablation
    exactly when special positions are present, and equals it when they are not."""
    with_special = score(tiny_llama, blocks, {"zero": Zero()}, HookPoint(1, "mlp_out"))["zero"]
    assert with_special["ce_sae"] != pytest.approx(with_special["ce_ablated"], abs=1e-4)
    plain = blocks[:, 1:].clone()
    plain[plain == tiny_llama.tokenizer.eos_token_id] = 5
    without = score(tiny_llama, plain, {"zero": Zero()}, HookPoint(1, "mlp_out"))["zero"]
    assert without["ce_loss_score"] == pytest.approx(0, abs=1e-6) and without["kl_div_score"] == pytest.approx(
        0, abs=1e-6
    )


def test_ce_clean_matches_a_manual_computation(tiny_llama, blocks):
    with torch.no_grad():
        logits = tiny_llama.model(input_ids=blocks).logits
    keep = ~special_mask(blocks, tiny_llama.tokenizer)[:, :-1]
    expected = torch.nn.functional.cross_entropy(logits[:, :-1][keep], blocks[:, 1:][keep]).item()
    found = score(tiny_llama, blocks, {"perfect": Identity()})["perfect"]
    assert found["ce_clean"] == pytest.approx(expected, abs=1e-5)
    assert found["ce_ablated"] > 0 and math.isfinite(found["ce_ablated"])


def test_mean_ablation_baseline_scores_a_mean_sae_zero_and_a_perfect_one_one(tiny_llama, blocks):
    hook = HookPoint(1, "resid_post")
    mean = torch.randn(tiny_llama.model.config.hidden_size)

    class Mean(nn.Module):
        d_sae = 1

        def forward(self, x):
            return mean.expand_as(x), x

    ctx = SpliceContext(
        tiny_llama.model,
        hook,
        blocks,
        tiny_llama.tokenizer,
        torch.device("cpu"),
        {"perfect": Identity(), "mean": Mean()},
        mean_activation=mean,
    )
    found = CEKL().compute_spliced(ctx, CEKL.Params(max_tokens=10_000))
    assert found["mean"]["ce_loss_score_mean"] == pytest.approx(0, abs=1e-6)
    assert found["mean"]["kl_div_score_mean"] == pytest.approx(0, abs=1e-6)
    assert found["perfect"]["ce_loss_score_mean"] == pytest.approx(1, abs=1e-5)
    assert found["mean"]["ce_mean_ablated"] == pytest.approx(found["mean"]["ce_sae"], abs=1e-6)
    # without a mean in the context there is no mean-ablation baseline
    assert "ce_loss_score_mean" not in score(tiny_llama, blocks, {"perfect": Identity()})["perfect"]


def test_hooks_of_one_layer_share_one_prefix_pass_with_identical_metrics(tiny_llama, blocks):
    """Every hook of layer 1 scored through one memo: one prefix pass per batch, the very numbers of a fresh
    prefix per hook."""
    shared, saes = Prefixes(tiny_llama.model), {"half": Scaled(), "zero": Zero()}
    params = CEKL.Params(max_tokens=10_000, batch_blocks=3)
    for site in HOOK_SITES:
        hook = HookPoint(1, site)
        args = (tiny_llama.model, hook, blocks, tiny_llama.tokenizer, torch.device("cpu"), saes)
        alone = CEKL().compute_spliced(SpliceContext(*args), params)
        assert CEKL().compute_spliced(SpliceContext(*args, prefixes=shared), params) == alone, site
    assert len(shared.found) == 2  # two batches (3 + 1 blocks) of one layer, whatever the hook
    other = CEKL().compute_spliced(
        SpliceContext(
            tiny_llama.model,
            HookPoint(2, "resid_post"),
            blocks,
            tiny_llama.tokenizer,
            torch.device("cpu"),
            saes,
            prefixes=shared,
        ),
        params,
    )
    assert len(shared.found) == 4 and other["half"]["ce_clean"] == alone["half"]["ce_clean"]


@pytest.mark.parametrize("batch_blocks", [1, 3])
def test_the_clean_pass_gives_the_model_loss_of_a_separate_pass(tiny_llama, blocks, batch_blocks):
    """``clean_loss`` receives the clean pass's summed CE over the blocks it covered: the separate perplexity
    pass's loss to 1e-6, so the runner need not make that pass."""
    received = []
    ctx = SpliceContext(
        tiny_llama.model,
        HOOK,
        blocks,
        tiny_llama.tokenizer,
        torch.device("cpu"),
        {"half": Scaled()},
        clean_loss=lambda *args: received.append(args),
    )
    found = CEKL().compute_spliced(ctx, CEKL.Params(max_tokens=10_000, batch_blocks=batch_blocks))["half"]
    separate = next_token_loss(tiny_llama.model, blocks, tiny_llama.tokenizer, device=torch.device("cpu"))
    ((n_blocks, total, count),) = received
    assert n_blocks == len(blocks) and count == separate["n_predictions"] == found["ce_tokens"]
    assert total / count == pytest.approx(separate["ce"], abs=1e-6)
    assert found["ce_clean"] == pytest.approx(separate["ce"], abs=1e-6)


# --- bootstrap intervals over eval blocks and paired differences --------------------------------------------


def scored_with_originals(tiny_llama, blocks, batch_blocks: int, seed: int = 0) -> dict[str, dict[str, float]]:
    """'half' against 'perfect' (scored here too), 'perfect' against a copy of itself (not scored here)."""
    perfect, half = Identity(), Scaled()
    ctx = SpliceContext(
        tiny_llama.model,
        HOOK,
        blocks,
        tiny_llama.tokenizer,
        torch.device("cpu"),
        {"perfect": perfect, "half": half},
        mean_activation=torch.zeros(tiny_llama.model.config.hidden_size),
        reference_saes={"half": perfect, "perfect": copy.deepcopy(perfect)},
    )
    params = CEKL.Params(max_tokens=10_000, batch_blocks=batch_blocks, resamples=300, seed=seed)
    return CEKL().compute_spliced(ctx, params)


def test_splice_values_and_intervals_do_not_depend_on_the_batch_size(tiny_llama, blocks):
    one, three = (scored_with_originals(tiny_llama, blocks, b) for b in (1, 3))
    for label in ("perfect", "half"):
        assert set(one[label]) == set(three[label]) == {output.name for output in CEKL.outputs}
        for key, value in three[label].items():
            assert one[label][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (label, key)


def test_splice_intervals_are_reproducible_and_a_difference_with_itself_is_exactly_zero(tiny_llama, blocks):
    first, again = (scored_with_originals(tiny_llama, blocks, 3, seed=5) for _ in range(2))
    assert first == again
    perfect, half = first["perfect"], first["half"]
    for key in DIFFERENCES:
        assert perfect[f"{key}_vs_original"] == 0.0, key
        assert perfect[f"{key}_vs_original_ci_low"] == perfect[f"{key}_vs_original_ci_high"] == 0.0, key
        assert half[f"{key}_vs_original"] == pytest.approx(half[key] - perfect[key], abs=1e-12), key
    # halving the activation moves the loss on every block: the interval of its KL difference excludes 0
    assert 0 < half["kl_sae_vs_original_ci_low"] <= half["kl_sae_vs_original"] <= half["kl_sae_vs_original_ci_high"]
    assert half["ce_sae_ci_low"] <= half["ce_sae"] <= half["ce_sae_ci_high"]


def test_ce_kl_shows_progress_only_when_asked(tiny_llama, blocks, capsys):
    saes = {"zero/original": Zero()}
    for progress in (False, True):
        cpu = torch.device("cpu")
        ctx = SpliceContext(tiny_llama.model, HOOK, blocks, tiny_llama.tokenizer, cpu, saes, progress=progress)
        CEKL().compute_spliced(ctx, CEKL.Params(max_tokens=10_000, batch_blocks=3))
        shown = "CE/KL layers.1.resid_post: 3 passes per batch" in capsys.readouterr().err
        assert shown == progress
