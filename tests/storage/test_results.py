"""The results store refuses what it cannot read, naming the file, the row and the column, and leaves it as it
was: rows edited outside saex, files and databases that are not saex stores."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from saex.storage.results import CellResult, ResultsStore, StoreError


def finished_store(path: Path) -> ResultsStore:
    store = ResultsStore(path)
    for key in ("k1", "k2"):
        assert store.claim(key, "m", {"model": "tiny"}, {"seed": 0})
        store.finish(CellResult(key, "m", {"model": "tiny"}, "done", {"fvu": 0.25}, details={"note": key}))
    return store


@pytest.mark.parametrize(
    "column,text,problem",
    [
        (
            "details",
            "{not json",
            "is not valid JSON (Expecting property name enclosed in double quotes: line 1 column 2",
        ),
        ("metrics", "[0.25]", "is not a JSON object (got '[0.25]')"),
        ("cell", "null", "is not a JSON object (got 'null')"),
        ("config", "7", "is not a JSON object (got '7')"),
    ],
)
def test_a_row_edited_outside_saex_names_the_store_row_and_column(tmp_path, column, text, problem):
    path = tmp_path / "results.sqlite"
    finished_store(path).close()
    with sqlite3.connect(path) as db:
        db.execute(f"update cells set {column} = ? where key = 'k2'", (text,))
    db.close()
    before = path.read_bytes()
    store = ResultsStore.existing(path)
    assert store.get("k1").details == {"note": "k1"}
    for read in (lambda: store.get("k2"), lambda: list(store.rows("m")), lambda: list(store.rows())):
        with pytest.raises(StoreError) as info:
            read()
        assert str(info.value).startswith(f"{path}: row 'k2': column '{column}' {problem}")
        assert str(info.value).endswith("; the store was left as it was")
    store.close()
    assert path.read_bytes() == before


def test_a_database_whose_cells_table_is_not_saex_is_refused_for_writing(tmp_path):
    path = tmp_path / "other.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("create table cells (id integer)")
    db.close()
    before = path.read_bytes()
    with pytest.raises(StoreError, match=r"not a saex results store \(table 'cells' lacks key, matrix, cell, config"):
        ResultsStore(path)
    assert path.read_bytes() == before


def test_an_empty_file_and_an_older_store_are_opened(tmp_path):
    empty = tmp_path / "empty.sqlite"
    empty.touch()
    finished_store(empty).close()
    assert [r.key for r in ResultsStore.existing(empty).rows()] == ["k1", "k2"]
    older = tmp_path / "older.sqlite"  # written before claims (no owner column) and phases existed
    with sqlite3.connect(older) as db:
        db.executescript(
            "CREATE TABLE cells (key TEXT PRIMARY KEY, matrix TEXT NOT NULL, cell TEXT NOT NULL, config TEXT NOT NULL,"
            " status TEXT NOT NULL, metrics TEXT NOT NULL DEFAULT '{}', cost TEXT NOT NULL DEFAULT '{}', details TEXT"
            " NOT NULL DEFAULT '{}', versions TEXT NOT NULL DEFAULT '{}', error TEXT, attempts INTEGER NOT NULL DEFAULT"
            " 0, started_at REAL, finished_at REAL)"
        )
    db.close()
    store = ResultsStore(older)
    assert "owner" in {row[1] for row in store.db.execute("PRAGMA table_info(cells)")}
    assert store.phase_totals("m") == []
