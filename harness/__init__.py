"""saex: does an SAE trained on a language model still explain its compressed version?

This package is the spine (the ``harness/`` folder of the repository); the built-in plugins are
``saex.plugins`` (the ``plugins/`` folder). What a plugin may import is re-exported here, and plugins, built-in
or third-party, import only from ``saex``: the hook marker, one Protocol per plugin kind, the objects handed
to plugins, the SAE base class and the helpers a plugin of each kind needs (docs/PLUGINS.md).
"""

from saex._version import __version__
from saex.analysis.alignment import best_cosines, hungarian
from saex.analysis.bootstrap import BlockSums, Bootstrap, BootstrapParams, Statistic, point, with_uncertainty
from saex.analysis.probing import (
    SPARSE_PROBING_KS,
    TPP_NS,
    accuracy_intervals,
    sparse_probing,
    sparse_probing_transfer,
    tpp,
)
from saex.analysis.survival import SURVIVAL_PROFILE, LatentPairs, Survival, SurvivalParams, classify, frequency_profile
from saex.data.assets import gemma3_dir, kjv_chapters, kjv_jsonl, smollm2_dir
from saex.data.corpus import special_mask, split_of
from saex.data.labelled import LabelledTexts, MissingDataPackage
from saex.data.labelled import ag_news as labelled_ag_news
from saex.data.labelled import amazon_sentiment as labelled_amazon_sentiment
from saex.data.labelled import biographies as labelled_biographies
from saex.data.labelled import from_file as labelled_from_file
from saex.data.labelled import github_code as labelled_github_code
from saex.data.labelled import kjv_genre as labelled_kjv_genre
from saex.data.labelled import manpages_languages as labelled_manpages_languages
from saex.downstream.evaluate import evaluate_tasks
from saex.downstream.tasks import TaskError, TaskMetric, check_tasks, offline_tasks, task_metrics
from saex.model.labelled_activations import LabelledActivations
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
    ExecutorError,
    LabelledParams,
    LabelledSet,
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
    "SPARSE_PROBING_KS",
    "SURVIVAL_PROFILE",
    "TPP_NS",
    "ActivationSource",
    "BlockSums",
    "Bootstrap",
    "BootstrapParams",
    "CompressionContext",
    "CompressionExpectation",
    "Compressor",
    "Corpus",
    "Executor",
    "ExecutorError",
    "Job",
    "LabelledActivations",
    "LabelledParams",
    "LabelledSet",
    "LabelledTexts",
    "LatentPairs",
    "Layout",
    "LoadedModel",
    "Metric",
    "MetricContext",
    "MetricOutput",
    "MissingDataPackage",
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
    "accuracy_intervals",
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
    "labelled_ag_news",
    "labelled_amazon_sentiment",
    "labelled_biographies",
    "labelled_from_file",
    "labelled_github_code",
    "labelled_kjv_genre",
    "labelled_manpages_languages",
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
    "sparse_probing",
    "sparse_probing_transfer",
    "special_mask",
    "split_of",
    "suffix_logits",
    "target_weights",
    "task_metrics",
    "tpp",
    "with_uncertainty",
    "worker_step",
    "zero_ablation",
]
