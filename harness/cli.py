"""The ``saex`` command: setup, plugins, validate, run, report.

Exit codes: 0 success, 1 some cells failed, 2 bad input (registry, plugin params, arguments).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from saex.assets import AssetError, kjv_jsonl, saex_home, smollm2_dir
from saex.cache import Cache
from saex.manager import KIND_HOOKS, PluginError, Plugins, load_plugins
from saex.matrix import expand
from saex.registry import DEVICE_PATTERN, Registry, RegistryError, load_registry
from saex.report import ReportExists, Section, markdown, write_report
from saex.run import Runner
from saex.store import ResultsStore, StoreError

PROJECT_REGISTRY = Path(__file__).resolve().parent.parent / "registry.yaml"
DEFAULT_STORE = Path("results") / "saex.sqlite"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saex", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def with_registry(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--registry",
            action="append",
            type=Path,
            default=[],
            help="extra registry file merged with the project's (repeatable)",
        )

    def with_store(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--store",
            type=Path,
            default=Path(os.environ.get("SAEX_STORE", DEFAULT_STORE)),
            help=f"results database (default {DEFAULT_STORE}, or $SAEX_STORE)",
        )

    sub.add_parser("setup", help="fetch and prepare the embedded model and corpus (idempotent)")
    p = sub.add_parser("plugins", help="list every plugin component: kind, name, source, params schema")
    p.add_argument("--json", action="store_true", help="print the full JSON schemas")
    p = sub.add_parser("validate", help="validate the registry (and a matrix); runs nothing")
    with_registry(p)
    p.add_argument("matrix", nargs="?")
    p = sub.add_parser("run", help="run a matrix; finished cells are skipped")
    with_registry(p)
    with_store(p)
    p.add_argument("matrix")
    p.add_argument("--device", type=_device_name, help="override the matrix's device (auto, cpu, cuda, cuda:1, mps)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p = sub.add_parser("report", help="a matrix's results (or every row) as markdown; with --out, also PNG figures")
    with_registry(p)
    with_store(p)
    p.add_argument("matrix", nargs="?")
    p.add_argument("--layers", action="store_true", help="also list every compressed layer")
    p.add_argument("--out", type=Path, help="write report.md and PNG figures into this folder instead of printing")
    p.add_argument("--force", action="store_true", help="with --out: overwrite report files that already exist")
    return parser


def _device_name(text: str) -> str:
    if not re.fullmatch(DEVICE_PATTERN, text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; valid: auto, cpu, cuda, cuda:<index>, mps")
    return text


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "WARNING")  # it logs every module at INFO otherwise
    try:
        return COMMANDS[args.command](args)
    except (RegistryError, PluginError, StoreError) as exc:
        print(f"saex: error: {exc}", file=sys.stderr)
        return 2
    except AssetError as exc:
        print(f"saex: set-up failed: {exc}", file=sys.stderr)
        return 1


def _registry(args: argparse.Namespace, plugins: Plugins) -> Registry:
    return load_registry([PROJECT_REGISTRY, *args.registry], plugins)


def cmd_setup(args: argparse.Namespace) -> int:
    print(f"model:  {smollm2_dir()}")
    print(f"corpus: {kjv_jsonl()}")
    print(f"saex home: {saex_home()}")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    plugins = load_plugins()
    for kind in KIND_HOOKS:
        for name in plugins.names(kind):
            registered = plugins.components[kind][name]
            schema = registered.component.Params.model_json_schema()
            if args.json:
                print(
                    json.dumps(
                        {
                            "kind": kind,
                            "name": name,
                            "plugin": registered.plugin,
                            "source": registered.source,
                            "description": registered.component.description,
                            "params": schema,
                        }
                    )
                )
                continue
            fields = ", ".join(
                f"{f}: {spec.get('type', spec.get('anyOf', [{}])[0].get('type', 'object'))}"
                + (f" = {spec['default']!r}" if "default" in spec else " (required)")
                for f, spec in schema.get("properties", {}).items()
            )
            print(f"{kind:<12} {name:<16} {registered.source:<24} {registered.component.description}")
            print(f"{'':<12} params: {fields or '(none)'}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    registry = _registry(args, load_plugins())
    names = [args.matrix] if args.matrix else sorted(registry.matrices)
    for name in names:
        print(f"matrix {name}: {len(expand(name, registry.matrix(name)))} cells")
    print("registry OK: " + ", ".join(sorted(set(registry.origins.values()))))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    plugins = load_plugins()
    registry = _registry(args, plugins)
    registry.matrix(args.matrix)
    store = ResultsStore(args.store)
    runner = Runner(
        plugins,
        registry,
        store,
        Cache(saex_home() / "cache"),
        device=args.device,
        progress=not args.no_progress,
        log=lambda m: print(f"saex: {m}", file=sys.stderr),
    )
    results = runner.run(args.matrix)
    print(markdown(f"matrix {args.matrix}", results))
    print(f"results stored in {args.store}")
    failed = [r for r in results if r.status != "done"]
    return 1 if failed else 0


def cmd_report(args: argparse.Namespace) -> int:
    if args.force and not args.out:
        print("saex: error: --force only applies with --out", file=sys.stderr)
        return 2
    store = ResultsStore.existing(args.store)
    if args.matrix:
        registry = _registry(args, load_plugins())
        cells = expand(args.matrix, registry.matrix(args.matrix))
        results = [r for c in cells if (r := store.get(c.key(registry))) is not None]
        missing = len(cells) - len(results)
        note = f"{missing} of {len(cells)} cells have no result yet." if missing else ""
        sections = [Section(f"matrix {args.matrix}", results, note)]
    else:
        sections = [
            Section(f"matrix {name}", list(store.rows(name))) for name in sorted({r.matrix for r in store.rows()})
        ]
    if not args.out:
        for section in sections:
            print(markdown(section.title, section.results, layers=args.layers, note=section.note))
        return 0
    try:
        written = write_report(args.out, sections, layers=args.layers, force=args.force)
    except ReportExists as exc:
        print(f"saex: error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    for section in sections:
        if section.note:
            print(f"saex: {section.title}: {section.note}", file=sys.stderr)
    return 0


COMMANDS = {"setup": cmd_setup, "plugins": cmd_plugins, "validate": cmd_validate, "run": cmd_run, "report": cmd_report}

if __name__ == "__main__":
    sys.exit(main())
