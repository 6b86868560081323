"""The spine on the real embedded model (SmolLM2-135M) and corpus (KJV), at a small budget."""

import math

import pytest
import torch
import yaml

from saex.config.registry import load_registry
from saex.data.corpus import special_mask
from saex.plugin.manager import load_plugins
from saex.run.runner import Runner
from saex.storage.cache import Cache
from saex.storage.results import ResultsStore

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smollm2():
    from saex.plugins.models.embedded import SMOLLM2

    return SMOLLM2.load(SMOLLM2.Params(), torch.device("cpu"))


def test_embedded_model_is_smollm2_and_predicts_real_text(smollm2):
    from saex.plugins.corpora.kjv import KJV

    config = smollm2.model.config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert sum(p.numel() for p in smollm2.model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    text = next(KJV().documents(KJV.Params()))
    ids = smollm2.tokenizer(text, return_tensors="pt")["input_ids"][:, :128]
    with torch.no_grad():
        loss = smollm2.model(input_ids=ids, labels=ids).loss.item()
    # Genesis 1 is in every pretraining corpus: a working model is far below uniform (ln 49152 = 10.8)
    assert loss < 3.0 < math.log(49152)
    assert not special_mask(ids, smollm2.tokenizer)[0, 1:].any()


def test_small_matrix_on_smollm2(tmp_path):
    data = {
        "saes": {
            "it-topk": {
                "plugin": "topk",
                "params": {"expansion_factor": 4, "k": 16},
                "training": {"tokens": 32768, "batch_size": 512, "lr": 0.001},
            }
        },
        "matrices": {
            "it": {
                "models": ["smollm2"],
                "corpus": "kjv",
                "compressions": ["magnitude-50"],
                "hooks": ["layers.3.resid_post"],
                "saes": ["it-topk"],
                "metrics": ["reconstruction"],
                "device": "cpu",
                "tokens": {"train": 16384, "calibration": 1024, "eval": 4096},
            }
        },
    }
    extra = tmp_path / "it.yaml"
    extra.write_text(yaml.safe_dump(data))
    from saex.cli import PROJECT_REGISTRY

    plugins = load_plugins(entry_points=False)
    registry = load_registry([PROJECT_REGISTRY, extra], plugins)
    runner = Runner(
        plugins,
        registry,
        ResultsStore(tmp_path / "r.sqlite"),
        Cache(tmp_path / "cache"),
        progress=False,
        log=lambda m: None,
    )
    results = {(r.cell["source"], r.cell["scored_on"]): r for r in runner.run("it")}
    assert {r.status for r in results.values()} == {"done"}
    on_m, transfer, retrained = (
        results[("original", "base")],
        results[("original", "compressed")],
        results[("retrained", "compressed")],
    )
    layers = transfer.details["compression"]["layers"]
    assert len(layers) == 30 * 7 and all(abs(layer["sparsity"] - 0.5) < 1e-4 for layer in layers)
    for r in (on_m, transfer, retrained):
        assert r.metrics["l0"] <= 16 and 0 <= r.metrics["dead_frac"] < 0.5
    assert on_m.metrics["explained_variance"] > 0.6 and retrained.metrics["explained_variance"] > 0.6
    # magnitude-50% moves layer-3 activations: the transferred SAE explains them worse than on M
    assert transfer.metrics["explained_variance"] < on_m.metrics["explained_variance"]
