"""A model's activations at one hook on a labelled text set, for the concept-level evals: every real (non-special)
token of every text in order, which text each token belongs to, the texts' labels and their train/test split.
Per text, SAEBench's evals read the mean over its real tokens (``pooled``) of the activations or of an SAE's
latents (``pooled_codes``, encoded in batches and summed per text, never a [tokens, d_sae] tensor)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from saex.data.corpus import row_blocks
from saex.data.labelled import LabelledTexts, text_blocks, train_test_split
from saex.model.activations import ShardedActivations
from saex.plugin.protocols import ActivationSource
from saex.storage.cache import cache_key


@dataclass(frozen=True)
class LabelledInput:
    """A labelled set ready for a model: its texts as token rows (train split first, then test), which text each
    real token belongs to, the labels as class indices, and a content key (token rows and labels)."""

    name: str
    blocks: torch.Tensor  # [n_texts, max_tokens] int64 (saex.data.labelled.text_blocks)
    text_of: torch.Tensor  # [n_real_tokens] int64
    labels: torch.Tensor
    classes: tuple[str, ...]
    n_train: int
    second_labels: torch.Tensor | None
    second_classes: tuple[str, ...]
    key: str

    def with_activations(self, acts: ShardedActivations) -> LabelledActivations:
        n = len(self.labels)
        return LabelledActivations(
            acts,
            self.text_of,
            self.labels,
            self.classes,
            torch.arange(self.n_train),
            torch.arange(self.n_train, n),
            self.second_labels,
            self.second_classes,
        )


def prepare_labelled(
    texts: LabelledTexts, tokenizer, max_tokens: int, test_fraction: float, seed: int
) -> LabelledInput:
    """Split ``texts`` (stratified, deterministic) and tokenise them for one model's tokenizer."""
    train, test = train_test_split(texts, test_fraction, seed)
    both = LabelledTexts(
        texts.name,
        train.texts + test.texts,
        train.labels + test.labels,
        None if texts.second_labels is None else (train.second_labels or ()) + (test.second_labels or ()),
    )
    blocks = text_blocks(both.texts, tokenizer, max_tokens)
    labels = torch.from_numpy(both.label_ids())
    second = torch.from_numpy(both.label_ids(second=True)) if both.second_labels is not None else None
    key = cache_key({"blocks": cache_key({"rows": blocks.tolist()}), "labels": both.fingerprint})
    return LabelledInput(
        texts.name,
        blocks,
        row_blocks(blocks, tokenizer),
        labels,
        texts.classes,
        len(train),
        second,
        texts.second_classes,
        key,
    )


@dataclass
class LabelledActivations:
    acts: ActivationSource  # [n_tokens, d]: the real tokens of every text, text by text (unshuffled reads)
    text_of: torch.Tensor  # [n_tokens] int64: the text of each token
    labels: torch.Tensor  # [n_texts] int64: index into ``classes``
    classes: tuple[str, ...]
    train: torch.Tensor  # text indices of the train split
    test: torch.Tensor  # text indices of the test split
    second_labels: torch.Tensor | None = None  # [n_texts] int64 into ``second_classes`` (SCR), or None
    second_classes: tuple[str, ...] = ()

    @property
    def n_texts(self) -> int:
        return len(self.labels)

    def pooled_codes(
        self, encode: Callable[[torch.Tensor], torch.Tensor], device: torch.device, batch_size: int = 4096
    ) -> torch.Tensor:
        """[n_texts, width] float32: per text, the mean over its real tokens of ``encode(acts)`` (the identity for
        the model's own activations), computed in batches of tokens."""
        total: torch.Tensor | None = None
        start = 0
        with torch.no_grad():
            for batch in self.acts.iter_batches(batch_size):
                codes = encode(batch.to(device)).float().cpu()
                if total is None:
                    total = torch.zeros(self.n_texts, codes.shape[-1])
                total.index_add_(0, self.text_of[start : start + len(batch)], codes)
                start += len(batch)
        assert total is not None and start == len(self.text_of)
        counts = torch.bincount(self.text_of, minlength=self.n_texts).clamp(min=1)
        return total / counts[:, None]

    def pooled(self, device: torch.device) -> torch.Tensor:
        """[n_texts, d]: each text's mean activation over its real tokens."""
        return self.pooled_codes(lambda x: x, device)
