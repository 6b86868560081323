"""The tokenizer of a SentencePiece-style GGUF (``tokenizer.ggml.model = llama``, e.g. Gemma-3), rebuilt as
the BPE that SentencePiece and llama.cpp run on it.

Why not ``AutoTokenizer.from_pretrained(..., gguf_file=...)``: for Gemma, transformers 5.17 builds a
*Unigram* model from the GGUF scores, but those scores are BPE merge ranks (score = -rank). Viterbi then
prefers the earliest-merged short pieces ("▁t" + "he" scores -5, "▁the" -12): KJV becomes 1.81M tokens
instead of 0.97M, no BOS is added, and a ``save_pretrained`` round trip reloads it as a merge-less BPE
(one token per character, perplexity ~7,700). docs/MODELS.md ("A second embedded family") has the numbers.

SentencePiece's BPE merges, at each step, the adjacent pair whose concatenation is the vocabulary piece
with the highest score; a ``tokenizers`` BPE whose merges are ranked by that score does the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gguf import GGUFReader
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerFast
from transformers.tokenization_utils_base import generate_merges

# tokenizer.ggml.token_type values (SentencePiece's piece types)
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4


class GGUFTokenizerError(ValueError):
    """The GGUF's tokenizer is not one this module can rebuild."""


def _field(reader: GGUFReader, key: str) -> Any:
    field = reader.get_field(key)
    if field is None:
        raise GGUFTokenizerError(f"the GGUF has no {key}")
    return field.contents()


def _flag(reader: GGUFReader, key: str) -> bool:
    field = reader.get_field(key)
    return field is not None and bool(field.contents())


def spm_bpe_tokenizer(gguf: Path) -> PreTrainedTokenizerFast:
    """A fast tokenizer equal to SentencePiece's BPE on the GGUF's vocabulary, scores and piece types.

    Control pieces (``<bos>``, ``<start_of_turn>``, ...) become special tokens and user-defined pieces (runs
    of newlines, spaces, tabs, HTML tags) non-special added tokens, matched before BPE as SentencePiece does;
    neither can be produced by a merge. Reading the GGUF's metadata takes ~20 s (gguf's reader).
    """
    reader = GGUFReader(gguf)
    if (kind := _field(reader, "tokenizer.ggml.model")) != "llama":
        raise GGUFTokenizerError(f"tokenizer.ggml.model is {kind!r}; only SentencePiece ('llama') is rebuilt here")
    if _flag(reader, "tokenizer.ggml.add_space_prefix") or _flag(reader, "tokenizer.ggml.add_eos_token"):
        raise GGUFTokenizerError("a dummy space prefix or an appended EOS is not rebuilt here (Gemma uses neither)")
    tokens: list[str] = _field(reader, "tokenizer.ggml.tokens")
    scores: list[float] = _field(reader, "tokenizer.ggml.scores")
    types: list[int] = _field(reader, "tokenizer.ggml.token_type")
    bos, eos, unk, pad = (
        tokens[_field(reader, f"tokenizer.ggml.{name}_token_id")] for name in ("bos", "eos", "unknown", "padding")
    )

    vocab = {token: index for index, token in enumerate(tokens)}
    mergeable = {token: score for token, score, kind in zip(tokens, scores, types) if kind == _NORMAL}
    not_mergeable = [token for token, kind in zip(tokens, types) if kind != _NORMAL]
    model = BPE(vocab, generate_merges(vocab, mergeable, not_mergeable), unk_token=unk, byte_fallback=True)
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    added = [(token, kind == _CONTROL) for token, kind in zip(tokens, types) if kind in (_CONTROL, _USER_DEFINED)]
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, special in added if special])
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t, special in added if not special])
    if _flag(reader, "tokenizer.ggml.add_bos_token"):
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=bos, eos_token=eos, unk_token=unk, pad_token=pad
    )
