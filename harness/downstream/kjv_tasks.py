"""Items of the offline lm-eval tasks (``harness/downstream/lm_eval_tasks/*.yaml``), built from the embedded KJV's eval
split only: the chapters ``split_of`` assigns to eval, as the ``kjv`` corpus does, so no item was seen by an SAE
in training or by a compression in calibration. Every item records the chapters its texts come from.

Constructions (docs/DOWNSTREAM.md), each a function of its seed alone (``random.Random(seed)``):

- ``perplexity``: each eval chapter cut into passages of ``PASSAGE_VERSES`` consecutive verses (the last one
  shorter) joined by spaces, as the corpus joins them, in a seeded order so that a ``limit`` samples across books.
- ``next_verse``: for every pair of consecutive verses of an eval chapter, the first is the context and the
  choices are the second plus ``N_CHOICES - 1`` verses drawn from other eval chapters (distinct texts), at a
  seeded position.
- ``cloze``: for every eval verse with a lowercase word of 4+ letters after its third word, one such word (seeded
  choice) is held out; the context is the verse up to it, the choices are the word plus ``N_CHOICES - 1``
  occurrences of other such words drawn from other eval chapters (frequency-weighted, so no easy rare words;
  lowercase only, so no proper-noun giveaways).

The items are written once per (task, seed, KJV file) as jsonl into the saex cache (``lm_eval_tasks``) and read
from there; they are never committed.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from saex.data.assets import kjv_chapters, kjv_jsonl
from saex.data.corpus import split_of
from saex.storage.cache import Cache, cache_key
from saex.storage.fingerprints import file_digest
from saex.storage.home import saex_home

if TYPE_CHECKING:
    from datasets import DatasetDict

N_CHOICES = 4
PASSAGE_VERSES = 8  # perplexity documents: ~250 SmolLM2 tokens, affordable on a CPU where whole chapters are not
CLOZE_WORD = re.compile(r"[a-z]{4,}")
CLOZE_MIN_CONTEXT = 3  # words before the held-out one
TRAILING_PUNCTUATION = ",;:.?!'()"
BUILD_VERSION = 2  # bump when a construction changes: the cached items are then rebuilt

Item = dict[str, Any]


def eval_chapters() -> dict[int, list[str]]:
    """Chapter index -> verse texts, for the eval split's chapters only."""
    return {i: verses for i, verses in enumerate(kjv_chapters()) if split_of(i) == "eval"}


def perplexity_items(seed: int) -> list[Item]:
    items = [
        {"chapter": i, "first_verse": start, "text": " ".join(verses[start : start + PASSAGE_VERSES])}
        for i, verses in eval_chapters().items()
        for start in range(0, len(verses), PASSAGE_VERSES)
    ]
    random.Random(seed).shuffle(items)
    return items


def _draw(rng: random.Random, pool: list[tuple[int, str]], chapter: int, answer: str) -> list[tuple[int, str]]:
    """``N_CHOICES - 1`` distinct (chapter, text) from ``pool`` outside ``chapter``, none equal to ``answer``."""
    drawn: list[tuple[int, str]] = []
    while len(drawn) < N_CHOICES - 1:
        source, text = rng.choice(pool)
        if source != chapter and text != answer and all(text != t for _, t in drawn):
            drawn.append((source, text))
    return drawn


def _choice_item(rng: random.Random, chapter: int, context: str, answer: str, pool: list[tuple[int, str]]) -> Item:
    distractors = _draw(rng, pool, chapter, answer)
    gold = rng.randrange(N_CHOICES)
    choices = [text for _, text in distractors]
    choices.insert(gold, answer)
    return {
        "chapter": chapter,
        "context": context,
        "choices": choices,
        "gold": gold,
        "distractor_chapters": [source for source, _ in distractors],
    }


def next_verse_items(seed: int) -> list[Item]:
    chapters, rng = eval_chapters(), random.Random(seed)
    pool = [(i, verse) for i, verses in chapters.items() for verse in verses]
    items = [
        _choice_item(rng, i, first, second, pool)
        for i, verses in chapters.items()
        for first, second in itertools.pairwise(verses)
    ]
    rng.shuffle(items)
    return items


def _cloze_words(verse: str) -> list[tuple[int, str]]:
    """(position, word) of the words of ``verse`` that may be held out, trailing punctuation stripped."""
    words = [w.rstrip(TRAILING_PUNCTUATION) for w in verse.split(" ")]
    return [(k, w) for k, w in enumerate(words) if CLOZE_WORD.fullmatch(w)]


def cloze_items(seed: int) -> list[Item]:
    chapters, rng = eval_chapters(), random.Random(seed)
    pool = [(i, word) for i, verses in chapters.items() for verse in verses for _, word in _cloze_words(verse)]
    items = []
    for i, verses in chapters.items():
        for verse in verses:
            candidates = [(k, w) for k, w in _cloze_words(verse) if k >= CLOZE_MIN_CONTEXT]
            if candidates:
                k, word = rng.choice(candidates)
                items.append(_choice_item(rng, i, " ".join(verse.split(" ")[:k]), word, pool))
    rng.shuffle(items)
    return items


BUILDERS: dict[str, Callable[[int], list[Item]]] = {
    "perplexity": perplexity_items,
    "next_verse": next_verse_items,
    "cloze": cloze_items,
}


def items_file(construction: str, seed: int) -> Path:
    """The jsonl of ``construction``'s items for ``seed`` in the saex cache, built on first use."""
    key = cache_key(
        {"construction": construction, "seed": seed, "kjv": file_digest(kjv_jsonl()), "version": BUILD_VERSION}
    )

    def write(tmp: Path) -> dict[str, int]:
        items = BUILDERS[construction](seed)
        (tmp / "test.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
        return {"items": len(items)}

    return Cache(saex_home() / "cache").computed("lm_eval_tasks", key, write) / "test.jsonl"


def dataset(construction: str, seed: int) -> DatasetDict:
    """The items as lm-eval reads a task's data: one ``test`` split."""
    from datasets import Dataset, DatasetDict

    with items_file(construction, seed).open() as f:
        return DatasetDict({"test": Dataset.from_list([json.loads(line) for line in f])})


# lm-eval calls a YAML's ``custom_dataset`` with the task's metadata and ``dataset_kwargs`` (the seed) as keywords
def perplexity_dataset(seed: int, **metadata: object) -> DatasetDict:
    return dataset("perplexity", seed)


def next_verse_dataset(seed: int, **metadata: object) -> DatasetDict:
    return dataset("next_verse", seed)


def cloze_dataset(seed: int, **metadata: object) -> DatasetDict:
    return dataset("cloze", seed)
