"""The spine's import rule (docs/ARCHITECTURE.md): a module imports only its own subpackage and lower layers, inside
functions too; ``if TYPE_CHECKING:`` may point up only from the plugin contract; nothing under ``harness/`` imports
the package face ``saex``; built-in plugins import only ``saex`` and their own kind's helpers; no import circle."""

from __future__ import annotations

import ast
import shutil
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# lowest first; the face (saex/__init__.py) sits above all of them and nothing imports it
LAYERS = ("_version", "storage", "plugin", "data", "model", "sae", "analysis", "config", "run", "report",
          "downstream", "testing", "cli")  # fmt: skip
CONTRACT = "plugin"  # the only layer whose TYPE_CHECKING imports may point up


@dataclass(frozen=True)
class Import:
    file: Path
    line: int
    target: str  # dotted module name
    type_checking: bool


def module_name(path: Path, root: Path, package: str) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join((package, *parts))


def _type_checking_lines(tree: ast.Module) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports_of(path: Path, known: set[str]) -> list[Import]:
    """Every ``saex`` import in ``path`` (module level and inside functions), resolved to the module it loads:
    ``from saex.a import b`` is ``saex.a.b`` where that is a module, else ``saex.a``."""
    tree = ast.parse(path.read_text())
    guarded = _type_checking_lines(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                       for a in node.names]  # fmt: skip
        else:
            continue
        for target in targets:
            if target == "saex" or target.startswith("saex."):
                found.append(Import(path, node.lineno, target, node.lineno in guarded))
    return found


def spine_modules(root: Path) -> dict[str, Path]:
    return {module_name(p, root, "saex"): p for p in sorted(root.rglob("*.py"))}


def layer_of(module: str) -> str | None:
    """The layer a spine module belongs to, None for the face and the built-in plugins."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def violations(harness: Path, plugins: Path) -> list[str]:
    """Every import against the rule, each as ``file:line: what is wrong``."""
    spine = spine_modules(harness)
    builtins = {module_name(p, plugins, "saex.plugins"): p for p in sorted(plugins.rglob("*.py"))}
    known = set(spine) | set(builtins)
    problems = []
    edges: dict[str, set[str]] = {}
    for module, path in spine.items():
        here = layer_of(module)
        for imp in imports_of(path, known):
            where = f"{path.relative_to(harness.parent)}:{imp.line}"
            if module == "saex":
                continue  # the face re-exports the plugin API from every layer
            if imp.target == "saex":
                problems.append(f"{where}: imports the package face 'saex'; import the module that defines it")
                continue
            there = layer_of(imp.target)
            if there is None:
                problems.append(f"{where}: imports {imp.target}, which is not a spine module")
                continue
            if not imp.type_checking:
                edges.setdefault(module, set()).add(imp.target)
            if here is None or LAYERS.index(there) <= LAYERS.index(here):
                continue
            if imp.type_checking and here == CONTRACT:
                continue
            problems.append(f"{where}: {module} (layer {here}) imports {imp.target} (layer {there}, higher)")
    for module, path in builtins.items():
        kind = module.split(".")[2] if module.count(".") >= 2 else None
        for imp in imports_of(path, known):
            own = kind is not None and imp.target.startswith(f"saex.plugins.{kind}.")
            if imp.target != "saex" and not own:
                where = f"{path.relative_to(plugins.parent)}:{imp.line}"
                problems.append(f"{where}: built-in plugin imports {imp.target}; plugins import only 'saex'")
    problems += [f"import circle: {' -> '.join(c)}" for c in circles(edges)]
    return problems


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in edges.get(v, ()):
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_spine_keeps_its_import_rule():
    assert violations(ROOT / "harness", ROOT / "plugins") == []


def test_every_layer_is_a_subpackage_with_a_docstring():
    for layer in LAYERS:
        path = ROOT / "harness" / layer
        if (ROOT / "harness" / f"{layer}.py").exists():
            continue
        init = path / "__init__.py"
        assert init.exists(), layer
        assert ast.get_docstring(ast.parse(init.read_text())), f"{layer}/__init__.py has no docstring"
    flat = sorted(p.name for p in (ROOT / "harness").glob("*.py"))
    assert flat == ["__init__.py", "_version.py", "cli.py", "testing.py"]


def _copy(tmp_path: Path) -> tuple[Path, Path]:
    harness, plugins = tmp_path / "harness", tmp_path / "plugins"
    shutil.copytree(ROOT / "harness", harness, ignore=shutil.ignore_patterns("__pycache__", "plugins"))
    shutil.copytree(ROOT / "plugins", plugins, ignore=shutil.ignore_patterns("__pycache__"))
    return harness, plugins


def test_a_planted_back_import_is_named(tmp_path):
    harness, plugins = _copy(tmp_path)
    target = harness / "storage" / "cache.py"
    target.write_text(target.read_text() + "\n\ndef _late():\n    from saex.run.runner import Runner\n")
    lines = target.read_text().count("\n")
    found = violations(harness, plugins)
    assert f"harness/storage/cache.py:{lines}: saex.storage.cache (layer storage) imports saex.run.runner " \
        "(layer run, higher)" in found  # fmt: skip
    assert any(p.startswith("import circle:") and "saex.storage.cache" in p for p in found)


def test_a_face_import_a_circle_and_a_plugin_reaching_into_the_spine_are_named(tmp_path):
    harness, plugins = _copy(tmp_path)
    (harness / "storage" / "results.py").write_text("from saex import SAE\n")
    (harness / "storage" / "a.py").write_text("from saex.storage import b\n")
    (harness / "storage" / "b.py").write_text("def f():\n    from saex.storage import a\n")
    (plugins / "metrics" / "sneaky.py").write_text("from saex.storage.cache import Cache\n")
    found = violations(harness, plugins)
    assert "harness/storage/results.py:1: imports the package face 'saex'; import the module that defines it" in found
    assert "import circle: saex.storage.a -> saex.storage.b" in found
    assert (
        "plugins/metrics/sneaky.py:1: built-in plugin imports saex.storage.cache; plugins import only 'saex'" in found
    )
