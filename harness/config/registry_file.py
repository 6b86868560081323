"""Reading one registry file as untrusted input: every way it can be wrong is a ``RegistryError`` naming the
file and the YAML path, never a traceback, a hang or unbounded memory.

Limits: the file must be a regular file of at most ``MAX_BYTES`` of UTF-8 text; a key defined twice in one
mapping is an error (YAML would let the last one win silently); every mapping key is a string (``50:``,
``no:``, ``null:`` are not names); the document nests at most ``MAX_DEPTH`` levels and, with aliases expanded,
holds at most ``MAX_NODES`` values (an alias bomb of 9 levels of 9 expands to 9^9); numbers are finite.
"""

from __future__ import annotations

import math
import stat
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode

MAX_BYTES = 2 * 1024 * 1024
MAX_DEPTH = 64
MAX_NODES = 200_000


class RegistryError(ValueError):
    """Bad registry input: names the file, the YAML path, the value and the valid choices."""

    MAX_VALUE_CHARS = 200  # a huge value (an expanded alias, a pasted blob) is cut, never repr'd whole

    def __init__(
        self, file: str | Path, path: str, message: str, value: object = None, choices: list[str] | None = None
    ):
        self.file, self.path, self.value, self.choices = str(file), path, value, choices
        text = f"{file}: {path}: {message}"
        if value is not None:
            text += f" (got {_short_repr(value, self.MAX_VALUE_CHARS)})"
        if choices is not None:
            text += f"; valid choices: {', '.join(map(str, choices)) or '(none)'}"
        super().__init__(text)


class RegistryErrors(RegistryError):
    """Several registry errors found together: each on a line of its own."""

    def __init__(self, errors: list[RegistryError]):
        self.errors = errors
        first = errors[0]
        super().__init__(first.file, first.path, str(first).split(": ", 2)[-1])
        self.args = (f"{len(errors)} problems:\n" + "\n".join(f"  {e}" for e in errors),)


def _short_repr(value: object, limit: int) -> str:
    if isinstance(value, (dict, list, tuple)):
        try:
            too_large = _count_nodes(value, limit) > limit
        except _TooDeep:
            too_large = True
        if too_large:
            return f"<{type(value).__name__} too large to show>"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping."""

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[object, object] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: the base class reports it
                break
            if duplicate:
                raise ConstructorError(
                    "while constructing a mapping", node.start_mark, f"key {key!r} given twice", key_node.start_mark
                )
            seen[key] = True
        return super().construct_mapping(node, deep=deep)


def read_registry_file(file: Path) -> dict[str, Any]:
    """The file's top-level mapping, checked against every limit of the module docstring."""
    text = _read_text(file)
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass: builds no Python objects
    except RecursionError:
        raise RegistryError(file, "(file)", f"nested too deeply (limit {MAX_DEPTH} levels)") from None
    except yaml.YAMLError as exc:
        raise RegistryError(file, _place(exc), f"not valid YAML: {_problem(exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RegistryError(file, "(top level)", "must be a mapping of sections", type(data).__name__)
    try:
        if _count_nodes(data, MAX_NODES) > MAX_NODES:
            raise RegistryError(file, "(file)", f"more than {MAX_NODES} values once aliases are expanded")
    except _TooDeep:
        raise RegistryError(file, "(file)", f"nested too deeply (limit {MAX_DEPTH} levels)") from None
    _check_values(file, data, "", 0)
    return data


def _place(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    return f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "(file)"


def _problem(exc: yaml.YAMLError) -> str:
    problem = getattr(exc, "problem", None) or str(exc)
    return problem if len(problem) <= 300 else problem[:297] + "..."


def _read_text(file: Path) -> str:
    try:
        info = file.stat()
    except FileNotFoundError:
        raise RegistryError(file, "(file)", "registry file not found") from None
    except OSError as exc:
        raise RegistryError(file, "(file)", f"cannot read: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"
        raise RegistryError(file, "(file)", f"is {kind}; expected a YAML file")
    if info.st_size > MAX_BYTES:
        raise RegistryError(file, "(file)", f"{info.st_size} bytes; a registry file holds at most {MAX_BYTES}")
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise RegistryError(file, "(file)", f"cannot read: {exc.strerror}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RegistryError(file, "(file)", f"not UTF-8 text (byte {exc.start})") from None


class _TooDeep(Exception):
    pass


def _count_nodes(value: object, limit: int) -> int:
    """Values in ``value`` with shared (aliased) parts counted each time they appear; stops past ``limit``.
    Raises ``_TooDeep`` beyond ``MAX_DEPTH`` levels."""
    memo: dict[int, int] = {}

    def count(v: object, depth: int) -> int:
        if depth > MAX_DEPTH:
            raise _TooDeep
        if isinstance(v, dict):
            children: list[object] = [*v.keys(), *v.values()]
        elif isinstance(v, (list, tuple)):
            children = list(v)
        else:
            return 1
        if id(v) not in memo:
            total = 1
            for child in children:
                total += count(child, depth + 1)
                if total > limit:
                    break
            memo[id(v)] = total
        return memo[id(v)]

    return count(value, 0)


def _check_values(file: Path, value: object, path: str, depth: int) -> None:
    """Every mapping key a string, every number finite, nesting bounded (``_count_nodes`` bounded the size)."""
    if depth > MAX_DEPTH:
        raise RegistryError(file, path or "(top level)", f"nested too deeply (limit {MAX_DEPTH} levels)")
    if isinstance(value, dict):
        for key, child in value.items():
            if not isinstance(key, str):
                where = path or "(top level)"
                message = f"every key must be a string: {key!r} is a YAML {type(key).__name__} (quote it)"
                raise RegistryError(file, where, message)
            _check_values(file, child, f"{path}.{key}" if path else key, depth + 1)
    elif isinstance(value, list):
        for index, child in enumerate(value):
            _check_values(file, child, f"{path}[{index}]", depth + 1)
    elif isinstance(value, float) and not math.isfinite(value):
        raise RegistryError(file, path, "must be a finite number", value)
