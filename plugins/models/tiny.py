"""Tiny random models of every architecture saex has a layout for, built from a config (no download), with the
byte tokenizer of ``tiny-llama``: for tests and dry runs on each layout (docs/MODELS.md).

Sliding-window layers get a window of ``sliding_window`` tokens, smaller than any useful block, so that a run
exercises the local/global attention (and, on Gemma-3, local/global RoPE) its layout must keep right.
"""

from __future__ import annotations

import hashlib
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from saex import LoadedModel, hookimpl
from saex.plugins.models.tiny_llama import byte_tokenizer

Architecture = Literal[
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "phi3",
    "mixtral",
    "qwen3_moe",
    "gemma2",
    "gemma3_text",
    "gemma3",
    "gpt2",
    "gpt_neox",
    "opt",
    "falcon",
    "bloom",
]


class TinyParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    architecture: Architecture = Field(description="an HF model_type (a key of saex's layout table)")
    hidden_size: int = Field(32, gt=0)
    intermediate_size: int = Field(64, gt=0)
    num_hidden_layers: int = Field(3, gt=0)
    num_attention_heads: int = Field(4, gt=0)
    sliding_window: int = Field(4, gt=0, description="window of sliding-window layers (Mistral, Qwen2, Gemma)")
    seed: int = 0


def _config_kwargs(p: TinyParams) -> dict[str, object]:
    """Config arguments of ``p.architecture``: what the shared sizes are called there, and the tiny choices
    (two KV heads, head_dim from the hidden size, four experts of which two are active, mixed layer types)."""
    h, i, heads, window = p.hidden_size, p.intermediate_size, p.num_attention_heads, p.sliding_window
    gqa = {"num_key_value_heads": 2, "head_dim": h // heads}
    moe = {"num_experts_per_tok": 2, **gqa}
    gemma3_text = {**gqa, "sliding_window": window, "sliding_window_pattern": 2}
    return {
        "llama": gqa,
        "mistral": {**gqa, "sliding_window": window},
        "qwen2": {**gqa, "use_sliding_window": True, "sliding_window": window, "max_window_layers": 1},
        "qwen3": gqa,
        "phi3": gqa,
        "mixtral": {**moe, "num_local_experts": 4},
        "qwen3_moe": {**moe, "num_experts": 4, "moe_intermediate_size": i // 2, "mlp_only_layers": [0]},
        "gemma2": {**gqa, "sliding_window": window},
        "gemma3_text": gemma3_text,
        "gemma3": {
            "text_config": {**_shared(p), **gemma3_text},
            "vision_config": {
                "hidden_size": 16,
                "intermediate_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "image_size": 16,
                "patch_size": 8,
            },
            "mm_tokens_per_image": 4,
        },
        "gpt2": {"n_inner": i},
        "gpt_neox": {},
        "opt": {"ffn_dim": i, "word_embed_proj_dim": h},
        "falcon": {"ffn_hidden_size": i},
        "bloom": {},
    }[p.architecture]


def _shared(p: TinyParams) -> dict[str, object]:
    return {
        "vocab_size": 259,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 2,
        "hidden_size": p.hidden_size,
        "intermediate_size": p.intermediate_size,
        "num_hidden_layers": p.num_hidden_layers,
        "num_attention_heads": p.num_attention_heads,
        "max_position_embeddings": 1024,
    }


def tiny_model(params: TinyParams) -> torch.nn.Module:
    """A random ``params.architecture`` causal LM (eval mode, float32, seeded)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    shared = {} if params.architecture == "gemma3" else _shared(params)
    config = AutoConfig.for_model(params.architecture, **shared, **_config_kwargs(params))
    torch.manual_seed(params.seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


class Tiny:
    name = "tiny"
    description = "a random model of any supported architecture built from a config (byte tokenizer); for tests"
    Params = TinyParams

    def load(self, params: TinyParams, device: torch.device) -> LoadedModel:
        fingerprint = hashlib.sha256(f"tiny:{params.model_dump_json()}".encode()).hexdigest()[:16]
        return LoadedModel(tiny_model(params).to(device), byte_tokenizer(), fingerprint)


@hookimpl
def register_models(register):
    register(Tiny())
