"""The built-in labelled text sets of the concept-level evals, each a thin reader of files that ship in packages
(``saex.data.labelled`` says what each package holds): AG News topics, GitHub code by language, Amazon 1 vs 5
stars and biographies by gender from sae-probes' wheel; Debian's man pages by language (section as second label);
the embedded KJV's books by genre; and a user's own CSV/JSONL file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pydantic import Field

from saex import (
    LabelledParams,
    LabelledSet,
    LabelledTexts,
    hookimpl,
    kjv_jsonl,
    labelled_ag_news,
    labelled_amazon_sentiment,
    labelled_biographies,
    labelled_from_file,
    labelled_github_code,
    labelled_kjv_genre,
    labelled_manpages_languages,
)


class SaeProbesParams(LabelledParams):
    per_class: int = Field(500, gt=1, description="texts kept per class")
    max_chars: int = Field(1000, gt=0, description="characters kept of each text")


class BiographiesParams(SaeProbesParams):
    with_profession: bool = Field(False, description="profession as second label (SCR), on the texts that have one")


class ManpagesParams(LabelledParams):
    languages: tuple[str, ...] = ("en", "de", "fr", "es", "nl")
    sections: tuple[str, ...] = ("1", "8")
    per_class: int = Field(100, gt=1)
    max_words: int = Field(64, gt=0)


class KJVParams(LabelledParams):
    per_class: int = Field(200, gt=1, description="passages kept per genre")
    max_words: int = Field(64, gt=0, description="words of each passage")


class FileParams(LabelledParams):
    path: Path = Field(description="a CSV file with a header row, or a JSONL file")
    text_column: str = "text"
    label_column: str = "label"
    second_label_column: str | None = None
    per_class: int | None = Field(None, gt=1)
    max_chars: int | None = Field(None, gt=0)


class SaeProbesSet:
    """One of sae-probes' sets, read with ``read(per_class, max_chars)``."""

    Params = SaeProbesParams

    def __init__(self, name: str, description: str, read: Callable[..., LabelledTexts]):
        self.name, self.description, self.read = name, description, read

    def load(self, params: SaeProbesParams) -> LabelledTexts:
        return self.read(per_class=params.per_class, max_chars=params.max_chars)


class Biographies:
    name = "biographies"
    description = "web passages about people labelled with their gender (sae-probes; profession as second label)"
    Params = BiographiesParams

    def load(self, params: BiographiesParams) -> LabelledTexts:
        return labelled_biographies(params.per_class, params.max_chars, with_profession=params.with_profession)


class Manpages:
    name = "manpages-languages"
    description = "Debian man page paragraphs by language (en de fr es nl), manual section as second label"
    Params = ManpagesParams

    def load(self, params: ManpagesParams) -> LabelledTexts:
        return labelled_manpages_languages(
            languages=params.languages, sections=params.sections, per_class=params.per_class, max_words=params.max_words
        )


class KJVGenre:
    name = "kjv-genre"
    description = "passages of the embedded King James Bible by its book's genre (law, history, wisdom, ...)"
    Params = KJVParams

    def load(self, params: KJVParams) -> LabelledTexts:
        return labelled_kjv_genre(kjv_jsonl(), per_class=params.per_class, max_words=params.max_words)


class LabelledFile:
    name = "labelled-file"
    description = "your own labelled texts: a CSV or JSONL file with a text and a label column (and a second label)"
    Params = FileParams

    def load(self, params: FileParams) -> LabelledTexts:
        return labelled_from_file(
            params.path,
            params.text_column,
            params.label_column,
            params.second_label_column,
            per_class=params.per_class,
            max_chars=params.max_chars,
        )


SAE_PROBES: dict[str, tuple[str, Callable[..., LabelledTexts]]] = {
    "ag-news": ("AG News articles by topic (World, Sports, Business; sae-probes)", labelled_ag_news),
    "github-code": ("GitHub code windows by language (C, Python, HTML; sae-probes)", labelled_github_code),
    "amazon-sentiment": ("Amazon reviews, 1 vs 5 stars (sae-probes)", labelled_amazon_sentiment),
}


@hookimpl
def register_labelled_sets(register: Callable[[LabelledSet], None]) -> None:
    for name, (description, read) in SAE_PROBES.items():
        register(SaeProbesSet(name, description, read))
    for component in (Biographies(), Manpages(), KJVGenre(), LabelledFile()):
        register(component)
