"""The worked examples of docs/PLUGINS.md (the files of tests/fixtures/plugins_guide/, named for their kind, and
COMPRESSION.md's ternary compression): each shown verbatim in the guide, loaded as a real plugin, checked on a
constructed case, and all of them together run on the guide's tiny matrix."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest
import torch
import yaml
from pydantic import ValidationError

from saex.config.registry import load_registry
from saex.model.activations import TensorActivations
from saex.plugin.manager import Plugins, load_plugins
from saex.plugin.protocols import MetricContext
from saex.plugins.models.tiny_llama import TinyLlama, byte_tokenizer
from saex.run.runner import Runner
from saex.sae.saelens import load_saelens, save_saelens
from saex.sae.sparsity import sae_sparsity
from saex.storage.cache import Cache
from saex.storage.results import ResultsStore

FIXTURES = Path(__file__).parent / "fixtures"
EXAMPLES = FIXTURES / "plugins_guide"
GUIDE = Path(__file__).parent.parent / "docs" / "PLUGINS.md"
# kind (manager.Kind, also the fixture's file name) -> the component the example registers
NAMES = {
    "model": "trainer-checkpoint",
    "corpus": "paragraphs",
    "sae": "relu-l1",
    "pruner": "random-latents",
    "metric": "large-errors",
}
CPU = torch.device("cpu")


def load_module(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def plugins() -> Plugins:
    """Built-ins, the five examples of the guide and its compression example (COMPRESSION.md's ternary)."""
    extra: list[tuple[str, object]] = [(f"guide.{k}", load_module(EXAMPLES / f"{k}.py", f"guide_{k}")) for k in NAMES]
    extra.append(("ternary", load_module(FIXTURES / "saex_ternary_plugin.py", "guide_ternary")))
    return load_plugins(extra, entry_points=False)


def test_guide_shows_every_example_verbatim() -> None:
    """Every python block of the guide is one example file (the plugins, and the test of one with saex.testing),
    and every example file is one python block."""
    blocks = re.findall(r"^```python\n(.*?)^```$", GUIDE.read_text(), flags=re.DOTALL | re.MULTILINE)
    assert sorted(blocks) == sorted(path.read_text() for path in EXAMPLES.glob("*.py"))


def test_every_example_registers_as_its_kind(plugins: Plugins) -> None:
    for kind, name in NAMES.items():
        registered = plugins.components[kind][name]
        assert (registered.plugin, registered.source) == (f"guide.{kind}", "explicit")
    assert plugins.components["compression"]["ternary"].plugin == "ternary"


def save_checkpoint(run: Path, step: int, seed: int) -> None:
    """A tiny random Llama and the byte tokenizer as a Trainer saves them in ``run/checkpoint-<step>``."""
    directory = run / f"checkpoint-{step}"
    loaded = TinyLlama().load(TinyLlama.Params(num_hidden_layers=2, seed=seed), CPU)
    loaded.model.save_pretrained(directory)
    byte_tokenizer().save_pretrained(directory)


def test_trainer_checkpoint_loads_the_step_asked_for(plugins: Plugins, tmp_path: Path) -> None:
    source = plugins.get("model", "trainer-checkpoint")
    for step, seed in ((100, 0), (200, 1)):
        save_checkpoint(tmp_path, step, seed)
    loaded = {step: source.load(source.Params(run=tmp_path, step=step), CPU) for step in (100, 200)}
    expected = TinyLlama().load(TinyLlama.Params(num_hidden_layers=2, seed=1), CPU).model
    assert torch.equal(loaded[200].model.lm_head.weight, expected.lm_head.weight)
    assert loaded[100].fingerprint != loaded[200].fingerprint
    assert loaded[200].tokenizer.bos_token_id == 0
    with pytest.raises(ValidationError, match=r"no checkpoint-300; it has \['checkpoint-100', 'checkpoint-200'\]"):
        source.Params(run=tmp_path, step=300)


def test_paragraphs_are_documents_and_the_content_is_the_fingerprint(plugins: Plugins, tmp_path: Path) -> None:
    corpus = plugins.get("corpus", "paragraphs")
    text = "I.\n\nIn the beginning\nwas the word.\n   \nAnd the word\n\n\n\nwas with God.\n"
    (tmp_path / "a.txt").write_text(text)
    params = corpus.Params(path=tmp_path / "a.txt", min_chars=3)
    assert list(corpus.documents(params)) == ["In the beginning\nwas the word.", "And the word", "was with God."]
    assert len(list(corpus.documents(corpus.Params(path=tmp_path / "a.txt")))) == 4
    (tmp_path / "b.txt").write_text(text)
    assert corpus.fingerprint(corpus.Params(path=tmp_path / "b.txt", min_chars=3)) == corpus.fingerprint(params)
    (tmp_path / "b.txt").write_text(text + "\nAmen.")
    assert corpus.fingerprint(corpus.Params(path=tmp_path / "b.txt", min_chars=3)) != corpus.fingerprint(params)


def test_large_errors_counts_tokens_reconstructed_worse_than_zero(plugins: Plugins) -> None:
    """An SAE with zero weights reconstructs every token as b_dec = (1, 0): errors 1, 2, 1.41, 0.6 against
    norms 2, 1, 1, 0.4, so three of four tokens count at ratio 1 and one (2 > 1.5 * 1) at ratio 1.5."""
    sae_class, metric = plugins.get("sae", "relu-l1"), plugins.get("metric", "large-errors")
    sae = sae_class.build(2, sae_class.Params(d_sae=4, normalize_input=False))
    with torch.no_grad():
        for weight in (sae.W_enc, sae.b_enc, sae.W_dec):
            weight.zero_()
        sae.b_dec.copy_(torch.tensor([1.0, 0.0]))
    x = torch.tensor([[2.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.4, 0.0]])
    ctx = MetricContext(sae=sae, eval_activations=TensorActivations(x), device=CPU, batch_size=3)
    assert metric.compute(ctx, metric.Params()) == {"large_error_share": 0.75}
    assert metric.compute(ctx, metric.Params(ratio=1.5)) == {"large_error_share": 0.25}
    assert [output.name for output in metric.outputs] == ["large_error_share"]


def test_random_latents_zeroes_a_seeded_share_of_latents(plugins: Plugins) -> None:
    sae_class, pruner = plugins.get("sae", "relu-l1"), plugins.get("pruner", "random-latents")
    sae = sae_class.build(8, sae_class.Params(d_sae=64))
    pruned = pruner.prune(sae, pruner.Params(), TensorActivations(torch.zeros(0, 8)), 0.25)
    dropped = (pruned.W_dec == 0).all(dim=1)
    assert int(dropped.sum()) == 16 and (pruned.W_enc[:, dropped] == 0).all() and (pruned.b_enc[dropped] == 0).all()
    assert torch.equal(pruned.W_dec[~dropped], sae.W_dec[~dropped]) and int((sae.W_dec == 0).sum()) == 0
    assert sae_sparsity(pruned, reference=sae)["sparsity"] == 0.25
    again = pruner.prune(sae, pruner.Params(), TensorActivations(torch.zeros(0, 8)), 0.25)
    other = pruner.prune(sae, pruner.Params(seed=1), TensorActivations(torch.zeros(0, 8)), 0.25)
    assert torch.equal(again.W_dec, pruned.W_dec) and not torch.equal(other.W_dec, pruned.W_dec)


def test_relu_l1_exports_to_saelens_as_standard(plugins: Plugins, tmp_path: Path) -> None:
    """Written for SAELens, the example reads back as the built-in ``relu`` (SAELens ``standard``) and encodes and
    reconstructs as it does, with its input scale folded into the weights."""
    sae_class = plugins.get("sae", "relu-l1")
    sae = sae_class.build(8, sae_class.Params(d_sae=32), seed=3)
    with torch.no_grad():
        sae.b_enc.uniform_(-0.2, 0.2, generator=torch.Generator().manual_seed(0))
        sae.norm_scale.fill_(2.0)
    architectures = {name: r.component for name, r in plugins.components["sae"].items()}
    read = load_saelens(save_saelens(sae, tmp_path / "lens"), architectures)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    assert read.name == "relu"
    torch.testing.assert_close(read(x)[0], sae(x)[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(read.encode(x), sae.encode(x), rtol=1e-5, atol=1e-5)


def test_the_examples_run_the_guides_tiny_matrix_together(
    plugins: Plugins, tmp_path: Path, text_corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SAEX_HOME", str(tmp_path / "home"))
    save_checkpoint(tmp_path / "run", 500, seed=0)
    (tmp_path / "docs.txt").write_text("\n\n".join(p.read_text() for p in sorted(text_corpus.glob("*.txt"))))
    registry = yaml.safe_load(re.search(r"^```yaml\n(.*?)^```$", GUIDE.read_text(), re.DOTALL | re.MULTILINE)[1])
    registry["models"]["ckpt"]["params"]["run"] = str(tmp_path / "run")
    registry["corpora"]["docs"]["params"]["path"] = str(tmp_path / "docs.txt")
    registry["matrices"]["guide"]["device"] = "cpu"
    path = tmp_path / "registry.yaml"
    path.write_text(yaml.safe_dump(registry))
    store = ResultsStore(tmp_path / "results.sqlite")
    runner = Runner(
        plugins, load_registry([path], plugins), store, Cache(tmp_path / "cache"), progress=False, log=lambda m: None
    )
    results = {(r.cell["source"], r.cell["compression"]): r for r in runner.run("guide")}
    cells = [("original", None), ("original", "ternary"), ("retrained", "ternary"), ("pruned:random@0.5", "ternary")]
    assert set(results) == set(cells)
    assert all(result.status == "done" for result in results.values()), [r.error for r in results.values()]
    metrics = {cell: result.metrics for cell, result in results.items()}
    assert metrics[cells[0]]["explained_variance"] > 0.5 and metrics[cells[0]]["large_error_share"] == 0
    layers = results[cells[1]].details["compression"]["layers"]
    assert len(layers) == 2 * 7 and all(layer["max_distinct_per_group"] == 3 for layer in layers)
    # half of the 128 latents zeroed: half the weights, about half the active latents, more large errors
    achieved = results[cells[3]].details["pruning"]["achieved"]
    assert (achieved["sparsity"], achieved["d_sae"], achieved["latents_removed"]) == (0.5, 128, 0)
    assert metrics[cells[3]]["l0"] < 0.6 * metrics[cells[1]]["l0"]
    assert metrics[cells[3]]["large_error_share"] > 0.01 > metrics[cells[1]]["large_error_share"]
