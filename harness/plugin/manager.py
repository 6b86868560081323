"""The plugin manager: built-ins and entry-point plugins loaded through one path, one manager per load.

Built-ins are found, not listed: every module under ``saex.plugins`` (the ``plugins/`` folder) that defines a
``hookimpl`` is a plugin named by its path below that package (``compression.magnitude``, ``sae.topk``), so a
new built-in is one new file. Third-party plugins come from the ``saex`` entry-point group, named by their
entry point. ``SAEX_PLUGINS`` (comma-separated names) limits loading to those plugins; ``SAEX_DISABLE_PLUGINS``
blocks names.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pluggy

from saex.plugin import hookspecs as spec
from saex.plugin.conformance import nonconformities
from saex.plugin.protocols import (
    Component,
    Compressor,
    Corpus,
    Executor,
    LabelledSet,
    Layout,
    Metric,
    ModelSource,
    SAEArchitecture,
    SAEPruner,
)

ENTRY_POINT_GROUP = "saex"
BUILTIN_PACKAGE = "saex.plugins"

Kind = Literal["model", "corpus", "labelled", "compression", "sae", "pruner", "metric", "executor"]
KIND_HOOKS: dict[Kind, str] = {
    "model": "register_models",
    "corpus": "register_corpora",
    "labelled": "register_labelled_sets",
    "compression": "register_compressors",
    "sae": "register_sae_architectures",
    "pruner": "register_sae_pruners",
    "metric": "register_metrics",
    "executor": "register_executors",
}
KIND_PROTOCOLS: dict[Kind, type] = {
    "model": ModelSource,
    "corpus": Corpus,
    "labelled": LabelledSet,
    "compression": Compressor,
    "sae": SAEArchitecture,
    "pruner": SAEPruner,
    "metric": Metric,
    "executor": Executor,
}


class PluginError(RuntimeError):
    """A plugin could not be loaded, registered a component that does not satisfy its kind's Protocol, or
    registered a component name another plugin registered too."""


@dataclass
class Registered:
    """One component with the plugin that contributed it."""

    kind: Kind
    component: Component
    plugin: str  # plugin name
    source: str  # "built-in" or "dist-name==version"


@dataclass
class Plugins:
    """A pluggy manager plus the components its plugins registered, by kind and name."""

    manager: pluggy.PluginManager
    sources: dict[str, str] = field(default_factory=dict)  # plugin name -> source
    components: dict[Kind, dict[str, Registered]] = field(default_factory=dict)
    layouts: dict[str, tuple[str, Layout]] = field(default_factory=dict)  # model type -> (plugin, layout)

    def get(self, kind: Kind, name: str) -> Component:
        try:
            return self.components[kind][name].component
        except KeyError:
            choices = sorted(self.components.get(kind, {}))
            raise KeyError(f"no {kind} plugin named {name!r}; choices: {choices}") from None

    def names(self, kind: Kind) -> list[str]:
        return sorted(self.components.get(kind, {}))

    def registry_files(self) -> list[Path]:
        files: list[Path] = []
        self.manager.hook.register_registry_files(register=lambda p: files.append(Path(p)))
        return files


def builtin_plugins() -> list[str]:
    """Dotted names of the built-in plugin modules, sorted: every module below ``saex.plugins`` with a hookimpl."""
    package = importlib.import_module(BUILTIN_PACKAGE)
    found = []
    for info in pkgutil.walk_packages(package.__path__, prefix=f"{BUILTIN_PACKAGE}."):
        module = importlib.import_module(info.name)
        if any(spec.hookimpl_opts(obj) for obj in vars(module).values()):
            found.append(info.name)
    return sorted(found)


def _builtin_name(module_name: str) -> str:
    return module_name.removeprefix(f"{BUILTIN_PACKAGE}.")


def _allowed(name: str) -> bool:
    allow = [n.strip() for n in os.environ.get("SAEX_PLUGINS", "").split(",") if n.strip()]
    block = [n.strip() for n in os.environ.get("SAEX_DISABLE_PLUGINS", "").split(",") if n.strip()]
    return (not allow or name in allow) and name not in block


def load_plugins(extra: list[tuple[str, object]] | None = None, *, entry_points: bool = True) -> Plugins:
    """Build a fresh manager: built-ins, then ``saex`` entry points, then ``extra`` (name, plugin object)."""
    manager = pluggy.PluginManager(spec.PROJECT)
    manager.add_hookspecs(spec)
    plugins = Plugins(manager)
    candidates: list[tuple[str, str, object]] = []  # (name, source, module or object)
    for module_name in builtin_plugins():
        candidates.append((_builtin_name(module_name), "built-in", module_name))
    if entry_points:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            source = f"{ep.dist.name}=={ep.dist.version}" if ep.dist else "entry point"
            candidates.append((ep.name, source, ep))
    for name, obj in extra or []:
        candidates.append((name, "explicit", obj))
    for name, source, obj in candidates:
        if not _allowed(name):
            continue
        plugins.sources[name] = source
        manager.register(_resolve(name, obj), name=name)
    for kind, hook_name in KIND_HOOKS.items():
        plugins.components[kind] = {}
        for impl in getattr(manager.hook, hook_name).get_hookimpls():
            _collect(plugins, kind, impl)
    for impl in manager.hook.register_layouts.get_hookimpls():
        _collect_layouts(plugins, impl)
    return plugins


def _resolve(name: str, obj: object) -> object:
    try:
        if isinstance(obj, str):
            return importlib.import_module(obj)
        if isinstance(obj, importlib.metadata.EntryPoint):
            return obj.load()
    except Exception as exc:  # a broken third-party plugin must say which one it is
        raise PluginError(
            f"could not load saex plugin {name!r}: {type(exc).__name__}: {exc}; "
            f"to run without it, set SAEX_DISABLE_PLUGINS={name}"
        ) from exc
    return obj


def _collect(plugins: Plugins, kind: Kind, impl: pluggy.HookImpl) -> None:
    name = impl.plugin_name
    table = plugins.components[kind]

    def register(component: Component) -> None:
        protocol = KIND_PROTOCOLS[kind]
        wrong = nonconformities(component, protocol)
        if wrong:
            raise PluginError(
                f"plugin {name!r} registered {kind} {_label(component)}, which does not satisfy "
                f"{protocol.__name__}: {'; '.join(wrong)}"
            )
        if component.name in table:
            other = table[component.name].plugin
            raise PluginError(f"{kind} {component.name!r} is registered by both plugin {other!r} and {name!r}")
        table[component.name] = Registered(kind, component, name, plugins.sources.get(name, "explicit"))

    impl.function(register=register)


def _collect_layouts(plugins: Plugins, impl: pluggy.HookImpl) -> None:
    name = impl.plugin_name

    def register(model_type: str, layout: Layout) -> None:
        if not isinstance(model_type, str) or not isinstance(layout, Layout):
            raise PluginError(
                f"plugin {name!r}: register_layouts takes register(model_type: str, layout: saex.Layout), "
                f"got ({model_type!r}, {type(layout).__name__})"
            )
        if model_type in plugins.layouts:
            other = plugins.layouts[model_type][0]
            raise PluginError(f"layout {model_type!r} is registered by both plugin {other!r} and {name!r}")
        plugins.layouts[model_type] = (name, layout)

    impl.function(register=register)


def _label(component: object) -> str:
    """``'topk' (TopKSAE)``: the component's name where it has one, and its class."""
    cls = component if isinstance(component, type) else type(component)
    name = getattr(component, "name", None)
    return f"{name!r} ({cls.__name__})" if isinstance(name, str) else cls.__name__
