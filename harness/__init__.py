"""saex: does an SAE trained on a language model still explain its compressed version?

This package is the spine (the ``harness/`` folder of the repository); the built-in plugins are
``saex.plugins`` (the ``plugins/`` folder). What a plugin may import is re-exported here, and plugins, built-in
or third-party, import only from ``saex``: the hook marker, one Protocol per plugin kind, the objects handed
to plugins, the SAE base class and the helpers a plugin of each kind needs (docs/PLUGINS.md).
"""

from saex._version import __version__
from saex.analysis.alignment import best_cosines, hungarian
from saex.analysis.bootstrap import BlockSums, Bootstrap, BootstrapParams, Statistic, point, with_uncertainty
from saex.analysis.survival import SURVIVAL_PROFILE, LatentPairs, Survival, SurvivalParams, classify, frequency_profile
from saex.data.assets import gemma3_dir, kjv_chapters, kjv_jsonl, smollm2_dir
from saex.data.corpus import special_mask, split_of
from saex.downstream.evaluate import evaluate_tasks
from saex.downstream.tasks import TaskError, TaskMetric, check_tasks, offline_tasks, task_metrics
from saex.model.linearize import conv1d_to_linear
from saex.model.loading import load_hf
from saex.model.splice import prefix, sae_transform, suffix_logits, zero_ablation
from saex.model.verify import Targets, check_group_size, dense_weight, linear_layers, n_m_holds, target_weights
from saex.plugin.hookspecs import hookimpl
from saex.plugin.protocols import (
    ActivationSource,
    CompressionContext,
    CompressionExpectation,
    Compressor,
    Corpus,
    Executor,
    Layout,
    LoadedModel,
    Metric,
    MetricContext,
    MetricOutput,
    ModelSource,
    NoParams,
    Requirement,
    SAEArchitecture,
    SAEPruner,
)
from saex.run.job import Job, WorkerSpec
from saex.run.worker import worker_step
from saex.sae.base import (
    SAE,
    SAEFormatError,
    SAELensExport,
    SAELensImport,
    SAEParams,
    SparseLatentDecode,
    SparsePattern,
    TrainStep,
    latents_fired,
    sample_batches,
)
from saex.sae.splice_context import SpliceContext
from saex.storage.fingerprints import directory_fingerprint, file_digest

__all__ = [
    "SAE",
    "SURVIVAL_PROFILE",
    "ActivationSource",
    "BlockSums",
    "Bootstrap",
    "BootstrapParams",
    "CompressionContext",
    "CompressionExpectation",
    "Compressor",
    "Corpus",
    "Executor",
    "Job",
    "LatentPairs",
    "Layout",
    "LoadedModel",
    "Metric",
    "MetricContext",
    "MetricOutput",
    "ModelSource",
    "NoParams",
    "Requirement",
    "SAEArchitecture",
    "SAEFormatError",
    "SAELensExport",
    "SAELensImport",
    "SAEParams",
    "SAEPruner",
    "SparseLatentDecode",
    "SparsePattern",
    "SpliceContext",
    "Statistic",
    "Survival",
    "SurvivalParams",
    "Targets",
    "TaskError",
    "TaskMetric",
    "TrainStep",
    "WorkerSpec",
    "__version__",
    "best_cosines",
    "check_group_size",
    "check_tasks",
    "classify",
    "conv1d_to_linear",
    "dense_weight",
    "directory_fingerprint",
    "evaluate_tasks",
    "file_digest",
    "frequency_profile",
    "gemma3_dir",
    "hookimpl",
    "hungarian",
    "kjv_chapters",
    "kjv_jsonl",
    "latents_fired",
    "linear_layers",
    "load_hf",
    "n_m_holds",
    "offline_tasks",
    "point",
    "prefix",
    "sae_transform",
    "sample_batches",
    "smollm2_dir",
    "special_mask",
    "split_of",
    "suffix_logits",
    "target_weights",
    "task_metrics",
    "with_uncertainty",
    "worker_step",
    "zero_ablation",
]
