"""lm-eval's HF model with SAEs spliced in, registered with lm-eval as ``saex`` (docs/DOWNSTREAM.md).

``SplicedLM`` is lm-eval's ``HFLM`` whose every forward pass, generation steps included, has each SAE's
reconstruction in place of the activation at its hook, at the positions of non-special input tokens: the same
splice as the CE/KL metric (``saex.model.hookpoints.spliced`` with ``saex.model.splice.sae_transform``). With no
SAE it is ``HFLM`` itself, so an identity SAE gives the bare model's numbers exactly.

``saex lm-eval ...`` is lm-eval's CLI with this model registered and saex's offline tasks on the task path:
``saex lm-eval --model saex --model_args pretrained=smollm2,sae=DIR,hook=layers.15.resid_post --tasks
saex_kjv_next_verse``. Importing this module imports lm-eval (seconds): ``saex.downstream.tasks`` does so on use.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from copy import deepcopy
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lm_eval import simple_evaluate
from lm_eval.__main__ import cli_evaluate
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from saex.data.corpus import special_mask
from saex.downstream.tasks import TASKS_DIR, TaskError, offline_note, offline_tasks
from saex.model.hookpoints import HookPoint, check_hook, parse_hook, spliced
from saex.model.layouts import attach_layout
from saex.model.loading import load_hf, resolve_device
from saex.model.splice import sae_transform
from saex.plugin.manager import load_plugins
from saex.plugin.protocols import LoadedModel
from saex.sae.base import SAE
from saex.sae.formats import describe, load_pretrained


@contextmanager
def spliced_at_tokens(
    model: nn.Module, saes: Mapping[HookPoint, SAE], tokenizer: PreTrainedTokenizerBase
) -> Iterator[None]:
    """Splice every SAE at its hook during forward passes in this block, at the non-special positions of each
    pass's own ``input_ids`` (read when the pass starts, so generation with a KV cache is spliced per step)."""
    if not saes:
        yield
        return
    current: list[torch.Tensor] = []

    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs["input_ids"] if kwargs.get("input_ids") is not None else args[0]
        current[:] = [~special_mask(ids, tokenizer)]

    with ExitStack() as stack:
        stack.callback(model.register_forward_pre_hook(record, with_kwargs=True).remove)
        for hook, sae in saes.items():
            stack.enter_context(spliced(model, hook, sae_transform(sae), lambda: current[0]))
        yield


def load_model(name: str, device: torch.device) -> LoadedModel:
    """A saex model plugin by name (``smollm2``, ``tiny-llama``, ..., default params), else an HF path or hub id."""
    plugins = load_plugins()
    if name in plugins.names("model"):
        source = plugins.get("model", name)
        loaded = source.load(source.Params(), device)
    else:
        loaded = load_hf(name, device, fingerprint=name)
    attach_layout(loaded.model, plugins.layouts)
    return loaded


def load_saes(
    paths: str | list[str] | None, hooks: str | list[str] | None, device: torch.device
) -> dict[HookPoint, SAE]:
    """SAEs from files in any format saex reads, each at its hook: ``hooks`` paired with ``paths`` in order, or
    the hook a file records where none is given."""
    paths = [paths] if isinstance(paths, str) else list(paths or [])
    hooks = [hooks] if isinstance(hooks, str) else list(hooks or [])
    if hooks and len(hooks) != len(paths):
        raise ValueError(f"{len(paths)} SAEs (sae=) but {len(hooks)} hook points (hook=): give one hook per SAE")
    plugins = load_plugins()
    architectures = {name: plugins.get("sae", name) for name in plugins.names("sae")}
    saes = {}
    for i, path in enumerate(paths):
        hook = hooks[i] if hooks else describe(Path(path)).saex_hook
        if hook is None:
            raise ValueError(f"{path} records no hook point: give hook=layers.<L>.<site>")
        saes[parse_hook(hook)] = load_pretrained(path, architectures).to(device).eval()
    return saes


def cli_device(name: str | None) -> torch.device:
    """The device asked for; as lm-eval's HF model, CUDA falls back to what there is (lm-eval's CLI passes
    ``cuda:0`` unless told otherwise)."""
    if name is None or (name.startswith("cuda") and not torch.cuda.is_available()):
        return resolve_device("auto")
    return resolve_device(name)


@register_model("saex")
class SplicedLM(HFLM):
    """``HFLM`` with ``saes`` (hook -> SAE) spliced in. ``pretrained`` is a loaded model (with ``tokenizer``) or,
    from the CLI, a saex model name or HF path; ``sae`` / ``hook`` name SAE files and their hook points there."""

    def __init__(
        self,
        pretrained: str | PreTrainedModel,
        sae: str | list[str] | None = None,
        hook: str | list[str] | None = None,
        saes: Mapping[HookPoint, SAE] | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        device: str | None = None,
        **kwargs: object,
    ) -> None:
        if isinstance(pretrained, str):
            loaded = load_model(pretrained, cli_device(device))
            pretrained, tokenizer = loaded.model, tokenizer or loaded.tokenizer
        # lm-eval gives a tokenizer without a pad token one (configure_pad_token): the caller's is left as it is
        super().__init__(pretrained=pretrained, tokenizer=deepcopy(tokenizer), **kwargs)
        self.saes = {**(saes or {}), **load_saes(sae, hook, self.device)}
        for point in self.saes:
            check_hook(self.model, point)

    def _model_call(self, *args: object, **kwargs: object) -> torch.Tensor:
        with spliced_at_tokens(self.model, self.saes, self.tokenizer):
            return super()._model_call(*args, **kwargs)

    def _model_generate(self, *args: object, **kwargs: object) -> torch.Tensor:
        with spliced_at_tokens(self.model, self.saes, self.tokenizer):
            return super()._model_generate(*args, **kwargs)


@contextmanager
def _global_rngs_kept() -> Iterator[None]:
    """``simple_evaluate`` seeds the global random, numpy and torch generators; the run around it keeps its own."""
    python, numpy = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng():
            yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy)


def run_tasks(lm: SplicedLM, tasks: list[str], *, limit: int | None, num_fewshot: int | None) -> dict[str, Any]:
    """lm-eval's ``simple_evaluate`` of ``lm`` on ``tasks`` (saex's offline tasks and any installed one), with
    its defaults. A task whose data cannot be downloaded is a ``TaskError`` naming the offline tasks."""
    installed = any(task not in offline_tasks() for task in tasks)
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=installed)
    try:
        with _global_rngs_kept():
            results = simple_evaluate(
                model=lm, tasks=tasks, limit=limit, num_fewshot=num_fewshot, task_manager=manager, log_samples=False
            )
    except ConnectionError as exc:
        raise TaskError(f"lm-eval could not reach a task's data ({exc}); {offline_note()}") from exc
    assert results is not None  # None only on non-zero ranks of a distributed run
    return results


def main(argv: list[str]) -> None:
    """lm-eval's CLI (``saex lm-eval ARGS``) with the ``saex`` model registered and saex's offline tasks on
    ``--include_path`` (unless one is given: lm-eval takes a single folder)."""
    if "--include_path" not in argv:
        argv = [*argv, "--include_path", str(TASKS_DIR)]
    sys.argv = ["lm-eval", *argv]
    cli_evaluate()
