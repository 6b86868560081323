"""lm-eval tasks as a splice metric (docs/DOWNSTREAM.md): every number lm-eval reports for each task, with each SAE
spliced in at the hook (``task/metric``, stderr as ``task/metric_stderr``) and for the scored model alone
(the same keys with ``_clean``), so a cell holds its model's task scores with and without its SAE.

lm-eval runs through ``saex.evaluate_tasks``: its HF model with the SAE spliced at non-special positions, as the
CE/KL metric splices it, and lm-eval's defaults otherwise, so the stored numbers are lm-eval's own. The scored
model alone is evaluated once per model and params, whatever the number of hooks.
"""

from __future__ import annotations

from typing import Self
from weakref import WeakKeyDictionary

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from saex import (
    SAE,
    MetricOutput,
    SpliceContext,
    TaskMetric,
    check_tasks,
    evaluate_tasks,
    hookimpl,
    offline_tasks,
    task_metrics,
)

CLEAN = "_clean"
PLOTTED_AGAINST = ("kl_div_score",)  # the CE/KL metric's score each task's first metric is drawn against
AGGREGATION = "lm-eval's aggregation over the task's items"


def _outputs(metric: TaskMetric, first: bool) -> tuple[MetricOutput, ...]:
    """Declarations of one lm-eval metric and its stderr, spliced and clean; a task's first metric is its headline,
    in the transfer gap and drawn against kl_div_score."""
    shown = metric.metric + ("" if metric.filter == "none" else f" ({metric.filter} filter)")
    found = []
    for suffix, subject in (("", "with the SAE spliced in at the hook"), (CLEAN, "of the scored model alone")):
        spliced = first and not suffix
        found.append(
            MetricOutput(
                name=metric.key + suffix,
                description=f"lm-eval {metric.task}: {shown} {subject}",
                aggregation=AGGREGATION,
                higher_is_better=metric.higher_is_better,
                headline=spliced,
                gap=spliced,
                plotted_against=PLOTTED_AGAINST if spliced else (),
                order=60,
            )
        )
        if metric.has_stderr:
            found.append(
                MetricOutput(
                    name=metric.stderr_key + suffix,
                    description=f"lm-eval's standard error of {metric.key + suffix}",
                    aggregation="standard error over the task's items",
                    range=(0, None),
                    order=61,
                )
            )
    return tuple(found)


def task_outputs(task: str) -> tuple[MetricOutput, ...]:
    return tuple(o for rank, m in enumerate(task_metrics(task)) for o in _outputs(m, first=rank == 0))


class LmEvalParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tasks: list[str] = Field(
        default_factory=lambda: list(offline_tasks()),
        min_length=1,
        description="lm-eval tasks, groups or tags: saex's offline tasks (saex_kjv_*) or any installed one whose "
        "data can be reached",
    )
    limit: int | None = Field(None, gt=0, description="items per task (lm-eval's limit: the first N)")
    num_fewshot: int | None = Field(None, ge=0, description="few-shot examples (None: each task's default)")
    batch_size: int = Field(8, gt=0, description="lm-eval's batch size; the numbers do not depend on it")

    @field_validator("tasks")
    @classmethod
    def _runnable(cls, tasks: list[str]) -> list[str]:
        check_tasks(tasks)
        return tasks


class LmEval:
    name = "lm-eval"
    scope = "splice"
    description = "lm-eval tasks (offline KJV tasks or installed ones) with each SAE spliced in, and without"

    def __init__(self) -> None:
        # insertion-ordered set of the tasks whose outputs are declared
        self._declared = declared = dict.fromkeys(offline_tasks())
        self._clean: WeakKeyDictionary[nn.Module, dict[str, dict[str, float]]] = WeakKeyDictionary()

        class Params(LmEvalParams):
            """Validating an entry's params (registry loading) declares the outputs of its tasks."""

            @model_validator(mode="after")
            def _declare(self) -> Self:
                declared.update(dict.fromkeys(self.tasks))
                return self

        self.Params = Params

    @property
    def outputs(self) -> tuple[MetricOutput, ...]:
        return tuple(o for task in self._declared for o in task_outputs(task))

    def _evaluate(self, ctx: SpliceContext, params: LmEvalParams, sae: SAE | None) -> dict[str, float]:
        return evaluate_tasks(
            ctx.model,
            ctx.tokenizer,
            {} if sae is None else {ctx.hook: sae},
            params.tasks,
            limit=params.limit,
            num_fewshot=params.num_fewshot,
            batch_size=params.batch_size,
        )

    def _bare(self, ctx: SpliceContext, params: LmEvalParams) -> dict[str, float]:
        """The scored model alone, once per model and params (every hook of a model shares it)."""
        runs = self._clean.setdefault(ctx.model, {})
        key = params.model_dump_json()
        if key not in runs:
            runs[key] = {name + CLEAN: value for name, value in self._evaluate(ctx, params, None).items()}
        return runs[key]

    def compute_spliced(self, ctx: SpliceContext, params: LmEvalParams) -> dict[str, dict[str, float]]:
        clean = self._bare(ctx, params)
        return {label: self._evaluate(ctx, params, sae) | clean for label, sae in ctx.saes.items()}


@hookimpl
def register_metrics(register):
    register(LmEval())
