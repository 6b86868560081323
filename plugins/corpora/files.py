"""Local text corpora: plain-text files (one document per file, or per blank-line-separated paragraph) and
jsonl files (one document per line, text under a field)."""

from __future__ import annotations

import glob
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator

from saex import file_digest, hookimpl


class LocalFiles:
    name = "files"
    description = "local .txt / .jsonl files matched by glob patterns, read in sorted path order"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        paths: list[str]
        format: Literal["text", "jsonl"] = "text"
        text_field: str = "text"
        split_paragraphs: bool = False

        @field_validator("paths")
        @classmethod
        def _non_empty(cls, paths: list[str]) -> list[str]:
            if not paths:
                raise ValueError("give at least one path or glob pattern")
            return paths

    def _files(self, params: Params) -> list[Path]:
        files = sorted(
            {Path(p) for pattern in params.paths for p in glob.glob(str(Path(pattern).expanduser()), recursive=True)}
        )
        files = [f for f in files if f.is_file()]
        if not files:
            raise FileNotFoundError(f"corpus 'files': no file matches {params.paths}")
        return files

    def documents(self, params: Params) -> Iterator[str]:
        for path in self._files(params):
            if params.format == "jsonl":
                with open(path, encoding="utf-8") as f:
                    for number, line in enumerate(f, 1):
                        if line.strip():
                            yield _jsonl_text(line, params.text_field, f"{path}:{number}")
            elif params.split_paragraphs:
                yield from (p for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip())
            else:
                yield path.read_text(encoding="utf-8")

    def fingerprint(self, params: Params) -> str:
        digests = [f"{p}:{file_digest(p)}" for p in self._files(params)]
        return hashlib.sha256((params.model_dump_json() + "|".join(digests)).encode()).hexdigest()[:16]


def _jsonl_text(line: str, field: str, where: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not valid JSON ({exc})") from exc
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if field not in record:
        raise KeyError(f"{where}: no field {field!r} (fields: {sorted(record)})")
    if not isinstance(record[field], str):
        raise ValueError(f"{where}: field {field!r} is {type(record[field]).__name__}, not text")
    return record[field]


class HFDataset:
    name = "hf-dataset"
    description = "an HF datasets dataset by name (needs it in the local HF cache or a network connection)"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        path: str
        name: str | None = None
        split: str = "train"
        text_field: str = "text"
        revision: str | None = None

    def documents(self, params: Params) -> Iterator[str]:
        from datasets import load_dataset

        data = load_dataset(params.path, params.name, split=params.split, revision=params.revision, streaming=True)
        for record in data:
            yield record[params.text_field]

    def fingerprint(self, params: Params) -> str:
        return hashlib.sha256(params.model_dump_json().encode()).hexdigest()[:16]


@hookimpl
def register_corpora(register):
    register(LocalFiles())
    register(HFDataset())
