"""The ``checkpoint`` compression: a compressed model saved by llm-compressor (compressed-tensors, dense) or hqq
loads back as M_c, measures as what it is (sparsity, N:M, distinct values per group, relative error to M) and
computes the same logits as the model that was saved; a checkpoint that is not a compressed M, or that saex
cannot load on CPU, is refused with the reason. Tiny random Llama (4 layers, d 64), 8 calibration blocks of 32."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import save_file

from saex.model.compressed import compress_verified
from saex.model.verify import clone_weights, linear_layers, verify
from saex.plugin.protocols import CompressionContext
from saex.plugins.compression.checkpoint import Checkpoint
from saex.plugins.compression.checkpoint_formats import CheckpointError, checkpoint_format
from saex.plugins.compression.hqq import HQQ
from saex.plugins.compression.llmcompressor_oneshot import run_oneshot
from saex.plugins.compression.rtn import RTN
from saex.plugins.compression.wanda import Wanda
from saex.plugins.models.tiny_llama import TinyLlama
from saex.storage.cache import Cache

pytestmark = pytest.mark.usefixtures("single_thread_module")


@pytest.fixture(scope="module")
def ctx(tiny_llama) -> CompressionContext:
    tokens = torch.randint(3, 259, (8, 32), generator=torch.Generator().manual_seed(0))
    return CompressionContext(tokens, tiny_llama.tokenizer, torch.device("cpu"), seed=0)


def wanda_2of4(model, ctx, directory: Path) -> None:
    Wanda().compress(model, Wanda.Params(pattern="2:4"), ctx)
    model.save_pretrained(directory, save_compressed=True)  # pruned weights are stored densely


def rtn(params: RTN.Params):
    def save(model, ctx, directory: Path) -> None:
        run_oneshot(model, RTN().modifier(model, params), ctx)  # not baked: the quantization state is saved
        model.save_pretrained(directory, save_compressed=True)

    return save


def hqq_4bit(model, ctx, directory: Path) -> None:
    from hqq.models.hf.base import AutoHQQHFModel

    HQQ().compress(model, HQQ.Params(nbits=4, group_size=16), ctx)
    AutoHQQHFModel.save_quantized(model, str(directory))


SAVERS = {
    "wanda-2of4": wanda_2of4,
    "rtn-w4g16": rtn(RTN.Params(bits=4, group_size=16)),
    "rtn-w8a8": rtn(RTN.Params(bits=8, group_size=None, activation_bits=8)),
    "hqq-4bit": hqq_4bit,
}


@pytest.fixture(scope="module")
def saved(tiny_llama, ctx, tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    """Each compression saved to its own directory, with the in-memory model that was saved."""
    out = {}
    for name, save in SAVERS.items():
        model, directory = copy.deepcopy(tiny_llama.model), tmp_path_factory.mktemp(name)
        save(model, ctx, directory)
        out[name] = directory, model
    return out


def load_and_verify(base, path: Path, ctx):
    """What the runner does with the checkpoint plugin: expectation, originals, compress, verify."""
    params = Checkpoint.Params(path=str(path))
    model = copy.deepcopy(base)
    expectation = Checkpoint().expectation(model, params)
    originals = clone_weights(model, expectation.targets)
    loaded = Checkpoint().compress(model, params, ctx)
    return loaded, expectation, verify(loaded, expectation.targets, expectation, originals)


def test_each_saved_format_loads_as_what_it_is(tiny_llama, saved, ctx):
    names = list(linear_layers(tiny_llama.model))
    measured = {}
    for name, (path, in_memory) in saved.items():
        loaded, expectation, report = load_and_verify(tiny_llama.model, path, ctx)
        assert expectation.targets == names and [r.name for r in report] == names, name
        with torch.no_grad():
            tokens = ctx.calibration_tokens[:2]
            assert torch.allclose(loaded(tokens).logits, in_memory(tokens).logits, rtol=0, atol=1e-6), name
        for layer in report:
            weight = in_memory.get_submodule(layer.name)
            weight = weight.dequantize() if hasattr(weight, "dequantize") else weight.weight
            original = tiny_llama.model.get_submodule(layer.name).weight
            expected = ((weight - original).norm() / original.norm()).item()
            assert layer.rel_error == pytest.approx(expected, rel=1e-5), (name, layer.name)
        measured[name] = expectation, report

    expectation, report = measured["wanda-2of4"]
    assert (expectation.sparsity, expectation.n_m, expectation.bits) == (0.5, (2, 4), None)
    assert all(r.sparsity == 0.5 and r.n_m_ok for r in report)
    assert {r.module_type for r in report} == {"Linear"}

    expectation, report = measured["rtn-w4g16"]
    assert (expectation.sparsity, expectation.bits, expectation.group_size) == (None, 4, 16)
    assert all(8 < r.max_distinct_per_group <= 16 and 0.05 < r.rel_error < 0.2 for r in report)

    expectation, report = measured["rtn-w8a8"]
    assert (expectation.bits, expectation.group_size) == (8, None)  # one int8 scale per output row
    assert all(32 < r.max_distinct_per_group <= 256 and r.rel_error < 0.02 for r in report)

    expectation, report = measured["hqq-4bit"]
    assert (expectation.bits, expectation.group_size, expectation.group_axis) == (4, 16, 1)
    assert all(8 < r.max_distinct_per_group <= 16 and r.module_type == "HQQLinear" for r in report)


def test_loading_leaves_m_unchanged_and_quantized_weights_baked(tiny_llama, saved, ctx):
    before = {k: v.clone() for k, v in tiny_llama.model.state_dict().items()}
    model = copy.deepcopy(tiny_llama.model)
    loaded = Checkpoint().compress(model, Checkpoint.Params(path=str(saved["rtn-w4g16"][0])), ctx)
    assert loaded is not model and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    layer = loaded.model.layers[0].mlp.up_proj
    assert [n for n, _ in layer.named_parameters()] == ["weight"] and not hasattr(layer, "quantization_scheme")
    assert torch.equal(loaded.lm_head.weight, tiny_llama.model.lm_head.weight)


def test_a_changed_checkpoint_gets_a_new_cache_key(tiny_llama, ctx, tmp_path):
    """The file hashes are in the params, so in the key: a re-saved checkpoint recomputes, an old pin fails."""
    directory, cache = tmp_path / "ckpt", Cache(tmp_path / "cache")

    def run(params):
        return compress_verified(cache, tiny_llama.model, {"model": "tiny"}, "mine", Checkpoint(), params, ctx, "c")

    wanda_2of4(copy.deepcopy(tiny_llama.model), ctx, directory)
    first = Checkpoint.Params(path=str(directory))
    assert run(first).details["from_cache"] is False and run(first).details["from_cache"] is True

    model = copy.deepcopy(tiny_llama.model)
    Wanda().compress(model, Wanda.Params(sparsity=0.25), ctx)
    model.save_pretrained(directory, save_compressed=True)
    second = Checkpoint.Params(path=str(directory))
    assert second.fingerprint != first.fingerprint
    recomputed = run(second)
    assert recomputed.details["from_cache"] is False
    assert {round(layer["sparsity"], 3) for layer in recomputed.details["layers"]} == {0.25}
    with pytest.raises(CheckpointError, match="changed since the registry was read"):
        Checkpoint().compress(copy.deepcopy(tiny_llama.model), first, ctx)
    with pytest.raises(ValidationError, match="the registry pins"):
        Checkpoint.Params(path=str(directory), fingerprint=first.fingerprint)


def other_model(kind: str) -> torch.nn.Module:
    if kind == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        config = Qwen2Config(
            vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4
        )
        return Qwen2ForCausalLM(config)
    return TinyLlama().load(TinyLlama.Params(hidden_size=32), torch.device("cpu")).model


@pytest.mark.parametrize(
    "kind, message",
    [
        ("qwen2", "is a Qwen2ForCausalLM, but M is a LlamaForCausalLM"),
        ("narrower", "has another config than M .*hidden_size: checkpoint 32, M 64"),
    ],
)
def test_a_checkpoint_of_another_model_is_refused(tiny_llama, kind, message, tmp_path):
    other_model(kind).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=message):
        Checkpoint().expectation(tiny_llama.model, Checkpoint.Params(path=str(tmp_path)))


def test_m_itself_is_not_a_compressed_checkpoint(tiny_llama, tmp_path):
    tiny_llama.model.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="equals M in every layer its `targets` select"):
        Checkpoint().expectation(tiny_llama.model, Checkpoint.Params(path=str(tmp_path)))


@pytest.mark.parametrize(
    "quantization, weights, message",
    [
        ({"quant_method": "gptq", "bits": 4}, "model.safetensors", "only through the gptqmodel package"),
        ({"quant_method": "awq", "bits": 4}, "model.safetensors", "only through the gptqmodel package"),
        ({"quant_method": "hqq"}, "model.safetensors", "HqqConfig route fails on CPU"),
        ({"quant_method": "bitsandbytes"}, "model.safetensors", "quant_method 'bitsandbytes'"),
        (
            {"quant_method": "compressed-tensors", "sparsity_config": {"format": "sparse-bitmask"}},
            "model.safetensors",
            "legacy sparse format 'sparse-bitmask'",
        ),
        (None, "pytorch_model.bin", "does not unpickle"),
    ],
)
def test_formats_that_cannot_load_on_cpu_are_refused_with_why(quantization, weights, message, tmp_path):
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    if quantization is not None:
        config["quantization_config"] = quantization
    (tmp_path / "config.json").write_text(json.dumps(config))
    if weights.endswith(".safetensors"):
        save_file({"x": torch.zeros(1)}, str(tmp_path / weights))
    else:
        (tmp_path / weights).write_bytes(b"")
    with pytest.raises(CheckpointError, match=message):
        checkpoint_format(tmp_path)


def test_params_need_an_existing_directory_and_record_its_fingerprint(saved, tmp_path):
    with pytest.raises(ValidationError, match="does not exist"):
        Checkpoint.Params(path=str(tmp_path / "nowhere"))
    params = Checkpoint.Params(path=str(saved["hqq-4bit"][0]))
    assert len(params.fingerprint) == 16
    assert Checkpoint.Params(**params.model_dump()) == params  # a resolved entry validates again as it is


def test_a_gpt2_checkpoint_matches_m_once_both_are_linear(tmp_path, ctx):
    """GPT-2 stores Conv1D weights [in, out]; the spine compresses a copy of M with them made Linear, and the
    loaded checkpoint is converted the same way, so shapes, sparsity and N:M read along the input dim."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from saex import conv1d_to_linear

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=259, n_embd=64, n_layer=2, n_head=4, n_positions=64)).eval()
    pruned = copy.deepcopy(base)
    with torch.no_grad():
        for block in pruned.transformer.h:
            weight = block.mlp.c_fc.weight  # Conv1D: [in 64, out 256]; keep the 2 largest of 4 inputs per output
            groups = weight.t().reshape(256, 16, 4)
            mask = torch.zeros_like(groups).scatter_(2, groups.abs().topk(2, dim=2).indices, 1)
            weight.copy_((groups * mask).reshape(256, 64).t())
    pruned.save_pretrained(tmp_path)

    params = Checkpoint.Params(path=str(tmp_path), targets={"include": [r"transformer\.h\.\d+\.mlp\.c_fc"]})
    model = conv1d_to_linear(copy.deepcopy(base))
    expectation = Checkpoint().expectation(model, params)
    assert (expectation.targets, expectation.sparsity, expectation.n_m) == (
        ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"],
        0.5,
        (2, 4),
    )
    loaded = Checkpoint().compress(model, params, ctx)
    report = verify(loaded, expectation.targets, expectation, clone_weights(model, expectation.targets))
    assert all(r.n_m_ok and r.shape == (256, 64) for r in report)
    with torch.no_grad():
        tokens = ctx.calibration_tokens[:2]
        assert torch.allclose(loaded(tokens).logits, pruned(tokens).logits, rtol=0, atol=1e-5)


def test_a_pickle_planted_in_an_hqq_checkpoint_is_never_executed(tiny_llama, tmp_path):
    import pickle

    class Payload:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "payload-ran",))

    config = copy.deepcopy(tiny_llama.model.config)
    config.architectures = ["LlamaForCausalLM"]  # as hqq's save_quantized writes it
    config.save_pretrained(tmp_path)
    (tmp_path / "qmodel.pt").write_bytes(pickle.dumps({"model.layers.0.mlp.up_proj": Payload()}))
    with pytest.raises(CheckpointError, match="weights_only=True"):
        Checkpoint().expectation(tiny_llama.model, Checkpoint.Params(path=str(tmp_path)))
    assert not (tmp_path / "payload-ran").exists()


def test_a_checkpoint_missing_a_tensor_is_refused_not_left_random(tiny_llama, tmp_path):
    from safetensors.torch import load_file

    tiny_llama.model.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"did not match every tensor.*model\.layers\.1\.mlp\.down_proj"):
        Checkpoint().expectation(tiny_llama.model, Checkpoint.Params(path=str(tmp_path)))
