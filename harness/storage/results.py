"""Results store (SQLite): one row per cell with its key, config, status, metrics, cost, versions and error.

A finished row is never replaced: re-running a matrix skips it. A failed row is retried on the next run and
its previous error kept in ``attempts``. Every column is valid JSON: a metric that is not a finite number is
stored as null, with the reason in ``details["absent_metrics"]`` (bare NaN is not JSON, and SQLite's JSON
functions reject it). ``ResultsStore.existing`` opens a store for reading only and refuses anything that is
not one (``saex report`` must never turn a stray file into a database).

Several processes may share a store: a process claims a cell before computing it (``claim``), recording itself
as the row's owner. A cell another live process owns is left to it; a claim expires when its owner is gone
(a process of this host that no longer runs, or an owner on another host silent for ``FOREIGN_CLAIM_SECONDS``).
"""

from __future__ import annotations

import json
import math
import os
import socket
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Status = Literal["running", "done", "failed"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS cells (
    key TEXT PRIMARY KEY,
    matrix TEXT NOT NULL,
    cell TEXT NOT NULL,
    config TEXT NOT NULL,
    status TEXT NOT NULL,
    metrics TEXT NOT NULL DEFAULT '{}',
    cost TEXT NOT NULL DEFAULT '{}',
    details TEXT NOT NULL DEFAULT '{}',
    versions TEXT NOT NULL DEFAULT '{}',
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    started_at REAL,
    finished_at REAL,
    owner TEXT
);
"""
PHASES_SCHEMA = """
CREATE TABLE IF NOT EXISTS phases (
    matrix TEXT NOT NULL,
    model TEXT NOT NULL,
    phase TEXT NOT NULL,
    seconds REAL NOT NULL,
    recorded_at REAL NOT NULL
);
"""
FOREIGN_CLAIM_SECONDS = 6 * 3600
SQLITE_HEADER = b"SQLite format 3\x00"


class StoreError(ValueError):
    """A results store that cannot be read: names the file and what is wrong with it."""


COLUMNS = ("key", "matrix", "cell", "config", "status", "metrics", "cost", "details", "versions", "error")


@dataclass
class CellResult:
    key: str
    matrix: str
    cell: dict[str, Any]
    status: Status
    metrics: dict[str, float | None] = field(default_factory=dict)  # None: absent, reason in details
    cost: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)  # e.g. the compression's per-layer report
    versions: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    config: dict[str, Any] = field(default_factory=dict)


class ResultsStore:
    def __init__(self, path: Path, *, db: sqlite3.Connection | None = None):
        self.path = Path(path)
        if db is None:
            db = _open_for_writing(self.path)
        self.db = db
        self.owner = f"{socket.gethostname()}:{os.getpid()}"

    @classmethod
    def existing(cls, path: Path) -> ResultsStore:
        """An existing store opened read-only; a missing file, another kind of file or another schema is a
        ``StoreError``."""
        path = Path(path)
        if not path.is_file():
            raise StoreError(f"{path}: no results store there (run a matrix first, or pass --store)")
        _check_header(path, "--store names the SQLite file a run wrote its results into")
        try:
            db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
            columns = {row[1] for row in db.execute("PRAGMA table_info(cells)")}
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{path}: not a saex results store ({exc})") from None
        missing = [c for c in COLUMNS if c not in columns]
        if missing:
            db.close()
            raise StoreError(f"{path}: not a saex results store (table 'cells' lacks {', '.join(missing)})")
        return cls(path, db=db)

    def close(self) -> None:
        self.db.close()

    def status(self, key: str) -> Status | None:
        row = self.db.execute("SELECT status FROM cells WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def claim(self, key: str, matrix: str, cell: dict, config: dict) -> bool:
        """Mark the cell running and owned by this process; False when it is done or another live process owns
        it (then that process computes it). Atomic across processes (an immediate transaction)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            row = self.db.execute("SELECT status, owner, started_at FROM cells WHERE key = ?", (key,)).fetchone()
            if row is not None and (row[0] == "done" or (row[0] == "running" and self._held_elsewhere(*row[1:]))):
                self.db.execute("COMMIT")
                return False
            self.db.execute(
                "INSERT INTO cells (key, matrix, cell, config, status, started_at, attempts, owner) "
                "VALUES (?, ?, ?, ?, 'running', ?, 1, ?) ON CONFLICT(key) DO UPDATE SET "
                "status='running', started_at=excluded.started_at, attempts=attempts+1, owner=excluded.owner",
                (key, matrix, json.dumps(cell), json.dumps(config, default=str), time.time(), self.owner),
            )
            self.db.execute("COMMIT")
            return True
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def waiting_on_others(self, key: str) -> bool:
        """True while another live process owns the running cell ``key``."""
        row = self.db.execute("SELECT status, owner, started_at FROM cells WHERE key = ?", (key,)).fetchone()
        return row is not None and row[0] == "running" and self._held_elsewhere(*row[1:])

    def _held_elsewhere(self, owner: str | None, started_at: float | None) -> bool:
        """A running row's claim by another process that is still alive (this process's own earlier claims,
        e.g. of a run it abandoned after an error, are stale)."""
        return owner != self.owner and not _claim_expired(owner, started_at)

    def finish(self, result: CellResult) -> None:
        metrics, absent = _finite(result.metrics)
        if absent:
            result.details["absent_metrics"] = absent
        with self.db:
            self.db.execute(
                "UPDATE cells SET status=?, metrics=?, cost=?, details=?, versions=?, error=?, finished_at=? "
                "WHERE key=? AND status='running' AND owner=?",
                (
                    result.status,
                    json.dumps(metrics, allow_nan=False),
                    json.dumps(_finite(result.cost)[0], allow_nan=False),
                    json.dumps(result.details, default=str),
                    json.dumps(result.versions),
                    result.error,
                    time.time(),
                    result.key,
                    self.owner,
                ),
            )

    def release(self, keys: Iterable[str], reason: str = "interrupted before it finished") -> int:
        """Give up this process's claims on ``keys`` still running (an interrupted run): each becomes a failed row
        with ``reason``, which the next run computes; finished rows are untouched. Returns how many were released."""
        with self.db:
            return sum(
                self.db.execute(
                    "UPDATE cells SET status='failed', error=?, finished_at=?, owner=NULL "
                    "WHERE key=? AND status='running' AND owner=?",
                    (reason, time.time(), key, self.owner),
                ).rowcount
                for key in keys
            )

    def record_phase(self, matrix: str, model: str, phase: str, seconds: float) -> None:
        """Seconds one phase of a run took (loading, compressing, collecting, training, scoring, ...)."""
        with self.db:
            self.db.execute(
                "INSERT INTO phases (matrix, model, phase, seconds, recorded_at) VALUES (?, ?, ?, ?, ?)",
                (matrix, model, phase, seconds, time.time()),
            )

    def phase_totals(self, matrix: str) -> list[tuple[str, str, float, int]]:
        """(model, phase, total seconds, times) of every run of ``matrix``, in first-recorded order; empty for
        stores written before phases were recorded."""
        if not self.db.execute("SELECT name FROM sqlite_master WHERE name = 'phases'").fetchone():
            return []
        return self.db.execute(
            "SELECT model, phase, SUM(seconds), COUNT(*) FROM phases WHERE matrix = ? GROUP BY model, phase "
            "ORDER BY MIN(rowid)",
            (matrix,),
        ).fetchall()

    def get(self, key: str) -> CellResult | None:
        return next(self._select(" WHERE key = ?", (key,)), None)

    def rows(self, matrix: str | None = None) -> Iterator[CellResult]:
        if matrix is None:
            return self._select("", ())
        return self._select(" WHERE matrix = ?", (matrix,))

    def _select(self, where: str, args: tuple) -> Iterator[CellResult]:
        query = "SELECT key, matrix, cell, status, metrics, cost, details, versions, error, config FROM cells"
        for key, mat, cell, status, metrics, cost, details, versions, error, config in self.db.execute(
            query + where + " ORDER BY rowid", args
        ):
            columns = {"cell": cell, "metrics": metrics, "cost": cost, "details": details, "versions": versions}
            read = {name: self._json_object(key, name, text) for name, text in (*columns.items(), ("config", config))}
            yield CellResult(key, mat, status=status, error=error, **read)

    def _json_object(self, key: str, column: str, text: object) -> dict[str, Any]:
        """A row's JSON column read back; a row edited or damaged outside saex is a ``StoreError`` naming the
        store, the row's key and the column."""
        try:
            value = json.loads(text) if isinstance(text, (str, bytes)) else None
        except ValueError as exc:  # JSONDecodeError, and a UnicodeDecodeError of bytes
            problem = f"is not valid JSON ({exc})"
        else:
            if isinstance(value, dict):
                return value
            problem = f"is not a JSON object (got {_preview(text)})"
        raise StoreError(f"{self.path}: row {key!r}: column {column!r} {problem}; the store was left as it was")


def _open_for_writing(path: Path) -> sqlite3.Connection:
    """A store opened for a run, created when missing. Anything at ``path`` that is not a saex results store (a
    folder, a text file, another program's database) is a ``StoreError``, and is checked before SQLite touches
    it, so it is left exactly as it was."""
    hint = "--store names the SQLite file a run writes its results into"
    if path.is_dir():
        raise StoreError(f"{path}: is a folder, not a saex results store; {hint}")
    if path.exists() and not path.is_file():  # a FIFO or a device: never opened (reading a FIFO would block)
        raise StoreError(f"{path}: is not a regular file, not a saex results store; {hint}")
    if path.exists() and str(path) != ":memory:":  # SQLite's name for a database in memory, never a file
        _check_header(path, hint)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, timeout=60, isolation_level=None)
    except (OSError, sqlite3.Error) as exc:
        raise StoreError(f"{path}: cannot open the results store ({exc})") from None
    try:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if tables and "cells" not in tables:
            shown = ", ".join(sorted(tables)[:5])
            raise StoreError(f"{path}: not a saex results store (an SQLite database of tables {shown}); {hint}")
        columns = {row[1] for row in db.execute("PRAGMA table_info(cells)")}
        missing = [c for c in COLUMNS if c not in columns]
        if tables and missing:
            raise StoreError(f"{path}: not a saex results store (table 'cells' lacks {', '.join(missing)}); {hint}")
        db.executescript(SCHEMA + PHASES_SCHEMA)
        if "owner" not in columns | {row[1] for row in db.execute("PRAGMA table_info(cells)")}:
            db.execute("ALTER TABLE cells ADD COLUMN owner TEXT")  # stores written before claims existed
    except sqlite3.DatabaseError as exc:
        db.close()
        raise StoreError(f"{path}: not a saex results store ({exc}); {hint}") from None
    except BaseException:
        db.close()
        raise
    return db


def _check_header(path: Path, hint: str) -> None:
    """Refuse a non-empty file that does not start as an SQLite database does (read only, never written)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(SQLITE_HEADER))
    except OSError as exc:
        raise StoreError(f"{path}: cannot read the results store ({exc.strerror})") from None
    if head and head != SQLITE_HEADER:
        raise StoreError(f"{path}: not a saex results store (not an SQLite database: it starts {head[:8]!r}); {hint}")


def _preview(text: object, limit: int = 40) -> str:
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


def _finite(values: dict[str, float | None]) -> tuple[dict[str, float | None], dict[str, str]]:
    """``values`` with every non-finite number replaced by None, and the reason per replaced key."""
    kept: dict[str, float | None] = {}
    absent: dict[str, str] = {}
    for key, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            kept[key], absent[key] = None, f"not a finite number ({value})"
        else:
            kept[key] = value
    return kept, absent


def _claim_expired(owner: str | None, started_at: float | None) -> bool:
    """Whether a running row's owner is gone: a dead process of this host, or a silent one elsewhere."""
    if not owner:
        return True  # a row from before claims, or an interrupted run of an older version
    host, _, pid = owner.rpartition(":")
    if host == socket.gethostname() and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    return time.time() - (started_at or 0) > FOREIGN_CLAIM_SECONDS
