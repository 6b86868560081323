"""Downstream evaluation through lm-eval (docs/DOWNSTREAM.md): which tasks exist here and what each reports
(``saex.downstream.evaluate`` runs them).

Light on purpose: lm-eval (seconds to import) is imported only when a task runs or a task that is not one of
saex's offline tasks is looked up, so registry validation of offline tasks stays instant.
"""

from __future__ import annotations

import functools
import math
import os
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from lm_eval.tasks._index import Entry


TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"
HUB_HOST = "huggingface.co"
OFFLINE_SWITCHES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


class TaskError(ValueError):
    """A task lm-eval cannot run here: unknown, or its data cannot be reached; the message lists the offline tasks."""


@dataclass(frozen=True)
class TaskMetric:
    """One number lm-eval reports for a task: its metric under one filter (``none`` for most tasks)."""

    task: str
    metric: str
    filter: str = "none"
    higher_is_better: bool | None = None
    has_stderr: bool = True

    @property
    def key(self) -> str:
        return result_key(self.task, self.metric, self.filter)

    @property
    def stderr_key(self) -> str:
        return result_key(self.task, f"{self.metric}_stderr", self.filter)


def result_key(task: str, metric: str, filter: str = "none") -> str:
    """``task/metric``, with ``[filter]`` when lm-eval reports the metric under a filter other than ``none``."""
    return f"{task}/{metric}" + ("" if filter == "none" else f"[{filter}]")


class _ConfigLoader(yaml.SafeLoader):
    """Reads task YAMLs as lm-eval indexes them: ``!function`` references stay strings, nothing is imported."""


_ConfigLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


@functools.cache
def offline_tasks() -> dict[str, dict[str, Any]]:
    """Task name -> YAML config of the tasks saex ships, which need no network
    (``harness/downstream/lm_eval_tasks``)."""
    configs = (yaml.load(path.read_text(), Loader=_ConfigLoader) for path in sorted(TASKS_DIR.glob("*.yaml")))
    return {cfg["task"]: cfg for cfg in configs}


def offline_note() -> str:
    return "offline tasks shipped with saex: " + ", ".join(offline_tasks())


@functools.cache
def _installed() -> dict[str, Entry]:
    """lm-eval's index of its installed tasks, groups and tags (built once per process: ~10 s)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR)).task_index


def _metrics_of(task: str, cfg: Mapping[str, Any], *, aggregate: bool = False) -> list[TaskMetric]:
    """The metrics a task's config (or a group's ``aggregate_metric_list``) makes lm-eval report, per filter."""
    from lm_eval.api.metrics import stderr_for_metric
    from lm_eval.api.registry import (
        DEFAULT_METRIC_REGISTRY,
        get_aggregation,
        get_metric_aggregation,
        is_higher_better,
    )

    defaults = DEFAULT_METRIC_REGISTRY.get(cfg.get("output_type", ""), [])
    entries = cfg.get("metric_list") or [{"metric": m} for m in defaults]
    filters = [f["name"] for f in cfg.get("filter_list") or []] or ["none"]
    found = []
    for entry in entries:
        name = entry.get("metric")
        if not isinstance(name, str):
            continue  # a metric given as a function: named only once lm-eval loads it
        better = entry.get("higher_is_better")
        better = is_higher_better(name) if better is None else better
        how = entry.get("aggregation")
        function = get_aggregation(how) if isinstance(how, str) else get_metric_aggregation(name)
        # lm-eval gives a stderr where the aggregation has one (its default bootstrap_iters > 0); groups pool theirs
        stderr = aggregate or (function is not None and stderr_for_metric(function, 1) is not None)
        found += [TaskMetric(task, name, f, better, stderr) for f in filters]
    return found


def _members(task: str) -> list[str] | None:
    """The member names of an installed group or tag; None for a task. ``TaskError`` for an unknown name."""
    from lm_eval.tasks._index import Kind

    index = _installed()
    entry = index.get(task)
    if entry is None:
        raise TaskError(f"lm-eval has no task, group or tag {task!r} (`lm-eval ls tasks` lists it); {offline_note()}")
    if entry.kind is Kind.TAG:
        return [name for name, other in index.items() if task in other.tags]
    if entry.kind is Kind.GROUP:
        return [m for m in (entry.cfg or {}).get("task", []) if isinstance(m, str)]
    return None


def task_metrics(task: str) -> list[TaskMetric]:
    """What lm-eval reports for ``task`` (a task, group or tag), as far as its configs say without loading data:
    a group's aggregate metrics and, recursively, its members'. ``TaskError`` for an unknown name."""
    if task in offline_tasks():
        return _metrics_of(task, offline_tasks()[task])
    members = _members(task)
    cfg = _installed()[task].cfg or {}
    if members is None:
        return _metrics_of(task, cfg)
    aggregated = _metrics_of(task, {"metric_list": cfg.get("aggregate_metric_list", [])}, aggregate=True)
    return aggregated + [metric for member in members for metric in task_metrics(member)]


def _leaf_configs(task: str) -> list[dict[str, Any]]:
    """The configs of the tasks that load data when ``task`` runs."""
    if task in offline_tasks():
        return [offline_tasks()[task]]
    members = _members(task)
    if members is None:
        return [_installed()[task].cfg or {}]
    return [cfg for member in members for cfg in _leaf_configs(member)]


def _hub_cached(dataset: str) -> bool:
    """Whether the Hugging Face caches on this machine hold ``dataset`` (either cache layout)."""
    hf_home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE", hf_home / "datasets"))
    hub_cache = Path(os.environ.get("HF_HUB_CACHE", hf_home / "hub"))
    return (datasets_cache / dataset.replace("/", "___")).exists() or (
        hub_cache / ("datasets--" + dataset.replace("/", "--"))
    ).exists()


@functools.cache
def hub_reachable() -> bool:
    """Whether the Hugging Face Hub can be reached (offline mode off and its host resolves)."""
    if any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in OFFLINE_SWITCHES):
        return False
    try:
        socket.getaddrinfo(HUB_HOST, 443)
    except OSError:
        return False
    return True


def unreachable_data(task: str) -> list[str]:
    """The Hub datasets ``task`` needs that are neither in the local caches nor reachable (empty: it can run)."""
    needed = [
        cfg["dataset_path"]
        for cfg in _leaf_configs(task)
        if not cfg.get("custom_dataset") and isinstance(cfg.get("dataset_path"), str)
    ]
    missing = [d for d in needed if not Path(d).exists() and not _hub_cached(d)]
    return [] if not missing or hub_reachable() else sorted(set(missing))


def check_tasks(tasks: Iterable[str]) -> None:
    """``TaskError`` for a name lm-eval does not know, or a task whose data cannot be reached from here."""
    for task in tasks:
        task_metrics(task)
        missing = unreachable_data(task)
        if missing:
            raise TaskError(
                f"lm-eval task {task!r} reads {', '.join(missing)} from the Hugging Face Hub, which cannot be reached "
                f"from here, and no local cache holds it; {offline_note()}"
            )


def flatten(results: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """lm-eval's ``results`` (task -> ``metric,filter`` -> value) as flat ``result_key``s; what is not a finite
    number (an alias, a stderr of ``N/A``) is left out."""
    flat = {}
    for task, values in results.items():
        for name, value in values.items():
            metric, _, filter = name.partition(",")
            if filter and isinstance(value, int | float) and math.isfinite(value):
                flat[result_key(task, metric, filter)] = float(value)
    return flat
