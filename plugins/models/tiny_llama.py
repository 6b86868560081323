"""Tiny random Llama models built from a config, with a byte-level tokenizer: for tests and dry runs."""

from __future__ import annotations

import hashlib

import torch
from pydantic import BaseModel, ConfigDict, Field

from saex import LoadedModel, hookimpl

SPECIAL_TOKENS = ["<s>", "</s>", "<pad>"]


def byte_tokenizer():
    """A byte-level BPE tokenizer without merges: 256 byte tokens after <s>, </s>, <pad> (ids 0, 1, 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


class TinyLlama:
    name = "tiny-llama"
    description = "a random Llama built from a config (byte tokenizer, vocab 259); for tests"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        hidden_size: int = Field(64, gt=0)
        intermediate_size: int = Field(128, gt=0)
        num_hidden_layers: int = Field(4, gt=0)
        num_attention_heads: int = Field(4, gt=0)
        num_key_value_heads: int = Field(2, gt=0)
        seed: int = 0

    def load(self, params: Params, device: torch.device) -> LoadedModel:
        from transformers import LlamaConfig, LlamaForCausalLM

        tokenizer = byte_tokenizer()
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=2,
            max_position_embeddings=1024,
            **params.model_dump(exclude={"seed"}),
        )
        torch.manual_seed(params.seed)
        model = LlamaForCausalLM(config).to(device).eval()
        fingerprint = hashlib.sha256(params.model_dump_json().encode()).hexdigest()[:16]
        return LoadedModel(model, tokenizer, fingerprint)


@hookimpl
def register_models(register):
    register(TinyLlama())
