"""saex: does an SAE trained on a language model still explain its compressed version?

This package is the spine (the ``harness/`` folder of the repository); the built-in plugins are
``saex.plugins`` (the ``plugins/`` folder). What a plugin may import is re-exported here, and plugins, built-in
or third-party, import only from ``saex``: the hook marker, one Protocol per plugin kind, the objects handed
to plugins, the SAE base class and the helpers a plugin of each kind needs (docs/PLUGINS.md).
"""

__version__ = "0.1.0"


from saex.alignment import best_cosines, hungarian
from saex.assets import gemma3_dir, kjv_chapters, kjv_jsonl, smollm2_dir
from saex.bootstrap import BlockSums, Bootstrap, BootstrapParams, Statistic, point, with_uncertainty
from saex.corpus import special_mask, split_of
from saex.downstream import TaskError, TaskMetric, check_tasks, evaluate_tasks, offline_tasks, task_metrics
from saex.linearize import conv1d_to_linear
from saex.models import directory_fingerprint, file_digest, load_hf
from saex.protocols import (
    ActivationSource,
    CompressionContext,
    CompressionExpectation,
    Compressor,
    Corpus,
    Executor,
    LoadedModel,
    Metric,
    MetricContext,
    MetricOutput,
    ModelSource,
    NoParams,
    SAEArchitecture,
    SAEPruner,
    SpliceContext,
)
from saex.run import Job
from saex.sae import (
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
from saex.spec import hookimpl
from saex.splice import prefix, sae_transform, suffix_logits, zero_ablation
from saex.survival import SURVIVAL_PROFILE, LatentPairs, Survival, SurvivalParams, classify, frequency_profile
from saex.verify import Targets, check_group_size, dense_weight, linear_layers, n_m_holds, target_weights

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
    "LoadedModel",
    "Metric",
    "MetricContext",
    "MetricOutput",
    "ModelSource",
    "NoParams",
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
    "zero_ablation",
]
