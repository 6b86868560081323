"""Results store (SQLite): one row per cell with its key, config, status, metrics, cost, versions and error.

A finished row is never replaced: re-running a matrix skips it. A failed row is retried on the next run and
its previous error kept in ``attempts``.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
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
    finished_at REAL
);
"""


@dataclass
class CellResult:
    key: str
    matrix: str
    cell: dict[str, Any]
    status: Status
    metrics: dict[str, float] = field(default_factory=dict)
    cost: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)  # e.g. the compression's per-layer report
    versions: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    config: dict[str, Any] = field(default_factory=dict)


class ResultsStore:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path)
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    def status(self, key: str) -> Status | None:
        row = self.db.execute("SELECT status FROM cells WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def start(self, key: str, matrix: str, cell: dict, config: dict) -> None:
        if self.status(key) == "done":
            raise RuntimeError(f"cell {key} is already done; results are never overwritten")
        with self.db:
            self.db.execute(
                "INSERT INTO cells (key, matrix, cell, config, status, started_at, attempts) "
                "VALUES (?, ?, ?, ?, 'running', ?, 1) ON CONFLICT(key) DO UPDATE SET "
                "status='running', started_at=excluded.started_at, attempts=attempts+1",
                (key, matrix, json.dumps(cell), json.dumps(config, default=str), time.time()),
            )

    def finish(self, result: CellResult) -> None:
        with self.db:
            self.db.execute(
                "UPDATE cells SET status=?, metrics=?, cost=?, details=?, versions=?, error=?, finished_at=? "
                "WHERE key=? AND status='running'",
                (
                    result.status,
                    json.dumps(result.metrics),
                    json.dumps(result.cost),
                    json.dumps(result.details, default=str),
                    json.dumps(result.versions),
                    result.error,
                    time.time(),
                    result.key,
                ),
            )

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
            yield CellResult(
                key,
                mat,
                json.loads(cell),
                status,
                json.loads(metrics),
                json.loads(cost),
                json.loads(details),
                json.loads(versions),
                error,
                json.loads(config),
            )
