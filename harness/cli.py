"""The ``saex`` command: setup, plugins, validate, run, report, browse, export, lm-eval.

Exit codes: 0 success, 1 some cells failed, 2 bad input (registry, plugin params, arguments).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from pydantic import BaseModel

from saex.config.matrix import resolve_matrix
from saex.config.registry import DEVICE_PATTERN, Registry, RegistryError, load_registry
from saex.data.assets import AssetError, kjv_jsonl, smollm2_dir
from saex.model.loading import resolve_device
from saex.plugin.manager import KIND_HOOKS, PluginError, Plugins, load_plugins
from saex.report.browser import BrowseError, Selection, browse
from saex.report.cells import with_sae_labels
from saex.report.markdown import ReportExists, ReportFolderError, Section, markdown, write_report
from saex.report.summary import next_steps, summary
from saex.run.export import FIELDS as EXPORT_FIELDS
from saex.run.export import FORMATS as EXPORT_FORMATS
from saex.run.export import ExportError, export_sae
from saex.run.outputs import declared_outputs
from saex.run.runner import Runner
from saex.storage.cache import Cache
from saex.storage.home import saex_home
from saex.storage.results import ResultsStore, StoreError

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

    def with_selection(p: argparse.ArgumentParser) -> None:
        for name, default in vars(Selection()).items():
            p.add_argument(f"--{name.replace('_', '-')}", type=int, default=default, help=f"feature pages: {name}")

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
    p.add_argument(
        "--executor",
        default="local",
        help="how cells are computed: local (default), ray, or an `executors` entry of the registry",
    )
    p = sub.add_parser(
        "report",
        help="a matrix's results (or every row): a compact table per group, --full for the markdown report; with "
        "--out, report.md, PNG figures and the HTML site",
    )
    with_registry(p)
    with_store(p)
    p.add_argument("matrix", nargs="?")
    p.add_argument("--full", action="store_true", help="print the full markdown report instead of the compact view")
    p.add_argument("--layers", action="store_true", help="also list every compressed layer (implies --full)")
    p.add_argument("--out", type=Path, help="write report.md and PNG figures into this folder instead of printing")
    p.add_argument("--force", action="store_true", help="with --out: overwrite report files that already exist")
    p.add_argument("--features", action="store_true", help="with --out and a matrix: add the feature browser")
    with_selection(p)
    p = sub.add_parser("browse", help="the feature browser of a matrix: its SAE's latents on M vs M_c, as HTML")
    with_registry(p)
    with_store(p)
    p.add_argument("matrix")
    p.add_argument("--out", type=Path, required=True, help="site folder (the browser goes to OUT/features)")
    p.add_argument("--device", type=_device_name, help="override the matrix's device (auto, cpu, cuda, cuda:1, mps)")
    for name in ("model", "hook", "sae", "compression"):
        p.add_argument(f"--{name}", help=f"only this {name} of the matrix (default: every one)")
    with_selection(p)
    p = sub.add_parser(
        "export",
        help="write the SAE of a finished cell to a folder in SAELens's format (or saex's); prints the folder",
    )
    with_registry(p)
    with_store(p)
    p.add_argument("--out", type=Path, required=True, help="the folder to write (refused if it exists, unless --force)")
    p.add_argument("--key", help="the cell's key, or a unique start of it (`saex report MATRIX` lists them)")
    p.add_argument("--matrix", help="the cell's matrix (with its fields below, or to narrow --key)")
    for name in EXPORT_FIELDS:
        p.add_argument(f"--{name}", help=f"the cell's {name} (needed only where the matrix has several)")
    p.add_argument("--format", choices=EXPORT_FORMATS, default="saelens", help="saelens (default) or saex")
    p.add_argument("--force", action="store_true", help="write into an existing folder, replacing its SAE files")
    p.add_argument("--device", type=_device_name, default="cpu", help="where the model is opened to find the SAE")
    # listed for --help only: ``main`` hands everything after ``lm-eval`` to lm-eval's own parser
    sub.add_parser(
        "lm-eval",
        help="lm-eval's CLI with the `saex` model (SAEs spliced in) and saex's offline tasks (docs/DOWNSTREAM.md)",
    )
    return parser


def _device_name(text: str) -> str:
    if not re.fullmatch(DEVICE_PATTERN, text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; valid: auto, cpu, cuda, cuda:<index>, mps")
    return text


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["lm-eval"]:
        return cmd_lm_eval(argv[1:])
    args = _parser().parse_args(argv)
    os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "WARNING")  # it logs every module at INFO otherwise
    from saex.plugin.protocols import ExecutorError

    try:
        return COMMANDS[args.command](args)
    except (RegistryError, PluginError, StoreError, ExecutorError) as exc:
        print(f"saex: error: {exc}", file=sys.stderr)
        return 2
    except AssetError as exc:
        print(f"saex: set-up failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:  # Ctrl-C: finished cells are in the store; claims of the rest are given back
        told = str(exc) or "cells done so far are kept, the rest are computed by the next run"
        print(f"saex: interrupted; {told}", file=sys.stderr)
        return 130


def _registry(args: argparse.Namespace, plugins: Plugins) -> Registry:
    """The registry read for the command's matrix: only problems of the files as a whole, of that matrix and of
    the entries it uses refuse the command; those elsewhere are printed as warnings (all refuse without one)."""
    registry = load_registry([PROJECT_REGISTRY, *args.registry], plugins, matrix=getattr(args, "matrix", None))
    for warning in registry.warnings:
        print(f"saex: warning: {warning}", file=sys.stderr)
    return registry


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
                + _default_note(registered.component.Params, f, spec)
                for f, spec in schema.get("properties", {}).items()
            )
            print(f"{kind:<12} {name:<16} {registered.source:<24} {registered.component.description}")
            print(f"{'':<12} params: {fields or '(none)'}")
    return 0


def _default_note(params: type[BaseModel], name: str, spec: dict) -> str:
    """`` = default``, `` (optional)`` for a default computed when absent, `` (required)``."""
    field = params.model_fields.get(name)
    if field is not None and field.is_required():
        return " (required)"
    return f" = {spec['default']!r}" if "default" in spec else " (optional)"


def cmd_validate(args: argparse.Namespace) -> int:
    registry = _registry(args, load_plugins())
    names = [args.matrix] if args.matrix else sorted(registry.matrices)
    for name in names:
        print(f"matrix {name}: {len(resolve_matrix(registry, name).cells)} cells")
    files = ", ".join(sorted(set(registry.origins.values())))
    if registry.warnings:
        count = len(registry.warnings)
        print(f"matrix {args.matrix} OK ({count} problem{'s' * (count > 1)} elsewhere, warned above): {files}")
    else:
        print(f"registry OK: {files}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    plugins = load_plugins()
    registry = _registry(args, plugins)
    registry.matrix(args.matrix)
    outputs = declared_outputs(plugins)
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
    results = runner.run(args.matrix, args.executor)
    print(summary(f"matrix {args.matrix}", with_sae_labels(results), outputs))
    print()
    print(next_steps(args.matrix, str(args.store), _finding_options(args)))
    failed = [r for r in results if r.status != "done"]
    return 1 if failed else 0


def cmd_report(args: argparse.Namespace) -> int:
    if args.force and not args.out:
        print("saex: error: --force only applies with --out", file=sys.stderr)
        return 2
    store = ResultsStore.existing(args.store)
    plugins = load_plugins()
    outputs = declared_outputs(plugins)
    if args.matrix:
        registry = _registry(args, plugins)
        cells = resolve_matrix(registry, args.matrix).cells
        results = with_sae_labels(r for c in cells if (r := store.get(c.key(registry))) is not None)
        missing = len(cells) - len(results)
        note = f"{missing} of {len(cells)} cells have no result yet." if missing else ""
        sections = [Section(f"matrix {args.matrix}", results, note, store.phase_totals(args.matrix))]
        names = [args.matrix]
    else:
        names = sorted({r.matrix for r in store.rows()})
        sections = [
            Section(f"matrix {name}", with_sae_labels(store.rows(name)), phases=store.phase_totals(name))
            for name in names
        ]
    if args.full and args.out:
        print("saex: error: --full prints the report; with --out it is written to report.md", file=sys.stderr)
        return 2
    if not args.out and (args.full or args.layers):
        for section in sections:
            print(
                markdown(
                    section.title,
                    section.results,
                    outputs,
                    layers=args.layers,
                    note=section.note,
                    phases=section.phases,
                )
            )
        return 0
    if not args.out:  # the compact view, as `saex run` ends
        for name, section in zip(names, sections):
            print(summary(section.title, section.results, outputs, note=section.note))
            print()
            print(next_steps(name, str(args.store), _finding_options(args)))
        return 0
    if args.features and not args.matrix:
        print("saex: error: --features needs a matrix", file=sys.stderr)
        return 2
    try:
        features = "features/index.html" if args.features else None
        written = write_report(args.out, sections, outputs, layers=args.layers, force=args.force, features=features)
        if args.features:
            written += _browse(args, plugins, registry, sections[0].results, link_report=True)
    except (ReportExists, ReportFolderError, BrowseError) as exc:
        print(f"saex: error: {exc}", file=sys.stderr)
        return 2
    for path in dict.fromkeys(written):  # the site's assets are shared by the report and the browser
        print(path)
    for section in sections:
        if section.note:
            print(f"saex: {section.title}: {section.note}", file=sys.stderr)
    return 0


def _finding_options(args: argparse.Namespace) -> list[str]:
    """The ``--registry`` and ``--store`` arguments a later command needs to find this command's results."""
    options = [f"--registry {path}" for path in args.registry]
    if args.store != Path(os.environ.get("SAEX_STORE", DEFAULT_STORE)):
        options.append(f"--store {args.store}")
    return options


def _browse(
    args: argparse.Namespace, plugins: Plugins, registry: Registry, results: list, *, link_report: bool
) -> list[Path]:
    """The feature browser of ``args.matrix`` into ``args.out/features``. Its runner only reads artifacts: it
    records no run phases (a scratch in-memory store), so browsing leaves the results store as it was."""
    runner = Runner(
        plugins,
        registry,
        ResultsStore(Path(":memory:")),
        Cache(saex_home() / "cache"),
        progress=False,
        log=lambda m: print(f"saex: {m}", file=sys.stderr),
    )
    device = resolve_device(getattr(args, "device", None) or registry.matrix(args.matrix).device)
    how = Selection(**{name: getattr(args, name) for name in vars(Selection())})
    chosen = {name: getattr(args, name, None) for name in ("model", "hook", "sae", "compression")}
    return browse(runner, args.matrix, results, args.out, device, how, link_report=link_report, **chosen)


def cmd_browse(args: argparse.Namespace) -> int:
    store = ResultsStore.existing(args.store)
    plugins = load_plugins()
    registry = _registry(args, plugins)
    results = [r for c in resolve_matrix(registry, args.matrix).cells if (r := store.get(c.key(registry)))]
    try:
        written = _browse(args, plugins, registry, results, link_report=(args.out / "index.html").exists())
    except BrowseError as exc:
        print(f"saex: error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    plugins = load_plugins()
    store = ResultsStore.existing(args.store)
    scope = args.matrix
    if args.key and not scope:  # the registry is read for the matrix of the cell the key names
        found = {r.matrix for r in store.rows() if r.key.startswith(args.key)}
        scope = found.pop() if len(found) == 1 else None
    registry = _registry(argparse.Namespace(**{**vars(args), "matrix": scope}), plugins)
    try:
        exported = export_sae(
            plugins,
            registry,
            store,
            saex_home() / "cache",
            args.out,
            matrix=args.matrix,
            key=args.key,
            fields={name: getattr(args, name) for name in EXPORT_FIELDS},
            format=args.format,
            force=args.force,
            device=resolve_device(args.device),
            log=lambda m: print(f"saex: {m}", file=sys.stderr),
        )
    except ExportError as exc:
        print(f"saex: error: {exc}", file=sys.stderr)
        return 2
    print(f"saex: cell {exported.key} ({exported.cell.label}): {exported.format} format", file=sys.stderr)
    print(exported.path)
    return 0


def cmd_lm_eval(argv: list[str]) -> int:
    from saex.downstream.lmeval import main as lm_eval_main  # lm-eval loads only for this command

    lm_eval_main(argv)
    return 0


COMMANDS = {
    "setup": cmd_setup,
    "plugins": cmd_plugins,
    "validate": cmd_validate,
    "run": cmd_run,
    "report": cmd_report,
    "browse": cmd_browse,
    "export": cmd_export,
}

if __name__ == "__main__":
    sys.exit(main())
