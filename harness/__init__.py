"""saex: does an SAE trained on a language model still explain its compressed version?

This package is the spine (the ``harness/`` folder of the repository); the built-in plugins are
``saex.plugins`` (the ``plugins/`` folder). What a plugin may import is re-exported here, and plugins, built-in
or third-party, import only from ``saex``: the hook marker, one Protocol per plugin kind, the objects handed
to plugins, the SAE base class and the helpers a plugin of each kind needs (docs/PLUGINS.md).
"""

__version__ = "0.1.0"


from saex.assets import kjv_jsonl, smollm2_dir
from saex.corpus import special_mask
from saex.models import directory_fingerprint, file_digest, load_hf
from saex.protocols import (
    ActivationSource,
    CompressionContext,
    CompressionExpectation,
    Compressor,
    Corpus,
    LoadedModel,
    Metric,
    MetricContext,
    ModelSource,
    NoParams,
    SAEArchitecture,
    SAEPruner,
    SpliceContext,
)
from saex.sae import (
    SAE,
    SAEParams,
    SparseLatentDecode,
    SparsePattern,
    TrainStep,
    latents_fired,
    sample_batches,
)
from saex.spec import hookimpl
from saex.splice import prefix, sae_transform, suffix_logits, zero_ablation
from saex.verify import Targets, check_group_size, linear_layers

__all__ = [
    "SAE",
    "ActivationSource",
    "CompressionContext",
    "CompressionExpectation",
    "Compressor",
    "Corpus",
    "LoadedModel",
    "Metric",
    "MetricContext",
    "ModelSource",
    "NoParams",
    "SAEArchitecture",
    "SAEParams",
    "SAEPruner",
    "SparseLatentDecode",
    "SparsePattern",
    "SpliceContext",
    "Targets",
    "TrainStep",
    "__version__",
    "check_group_size",
    "directory_fingerprint",
    "file_digest",
    "hookimpl",
    "kjv_jsonl",
    "latents_fired",
    "linear_layers",
    "load_hf",
    "prefix",
    "sae_transform",
    "sample_batches",
    "smollm2_dir",
    "special_mask",
    "suffix_logits",
    "zero_ablation",
]
