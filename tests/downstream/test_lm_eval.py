"""Downstream evaluation through lm-eval: the spliced model gives lm-eval's own numbers (the bare model's exactly
with an identity SAE, worse with a zero SAE), independent of batch size; the offline tasks are deterministic and
built from the eval split only; the metric plugin stores lm-eval's numbers unchanged and declares every key; the
registry and the lm-eval CLI reach it; unknown and unreachable tasks fail where they are named. One integration
test runs the real embedded model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError

from saex import SpliceContext, kjv_chapters, split_of
from saex.cli import PROJECT_REGISTRY
from saex.config.registry import load_registry
from saex.downstream.evaluate import evaluate_tasks
from saex.downstream.kjv_tasks import cloze_items, next_verse_items, perplexity_items
from saex.downstream.tasks import TASKS_DIR, flatten, hub_reachable, offline_tasks
from saex.model.hookpoints import HookPoint
from saex.plugin.manager import load_plugins
from saex.plugin.protocols import LoadedModel
from saex.plugins.metrics.lm_eval import CLEAN, LmEval
from saex.plugins.models.embedded import SMOLLM2
from saex.plugins.models.tiny_llama import TinyLlama
from saex.plugins.sae.relu import ReLUParams, ReLUSAE
from saex.plugins.sae.topk import TopKSAE
from saex.report.markdown import markdown
from saex.run.outputs import declared_outputs
from saex.run.runner import Runner
from saex.sae.base import save_sae
from saex.storage.cache import Cache
from saex.storage.results import ResultsStore

pytestmark = pytest.mark.usefixtures("single_thread_module")

TASKS = list(offline_tasks())
HOOK = HookPoint(1, "resid_post")
LIMIT = 12
REAL_HOOK, REAL_LIMIT = HookPoint(3, "resid_post"), 20  # on SmolLM2: ~110 s per evaluation of the 3 tasks


@pytest.fixture(scope="module")
def trained() -> LoadedModel:
    """A tiny Llama (TinyLlama defaults) trained for 60 steps on KJV train-split text: far from uniform (about
    3.5 bits per byte), so that an SAE can degrade it."""
    loaded = TinyLlama().load(TinyLlama.Params(), torch.device("cpu"))
    text = " ".join(" ".join(v) for i, v in enumerate(kjv_chapters()) if i < 40 and split_of(i) == "train")
    ids = torch.tensor(loaded.tokenizer(text, add_special_tokens=False)["input_ids"])
    model, generator = loaded.model.train(), torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        starts = torch.randint(0, len(ids) - 128, (16,), generator=generator)
        batch = torch.stack([ids[s : s + 128] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval().requires_grad_(False)
    return loaded


def scaled_identity(d: int, scale: float) -> ReLUSAE:
    """A real ReLU SAE with x_hat = scale * (relu(x) - relu(-x)): x exactly for ``scale`` 1, zero for 0."""
    sae = ReLUSAE(d, ReLUParams(d_sae=2 * d, normalize_input=False))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(scale * torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


def relative_difference(one: dict[str, float], other: dict[str, float]) -> float:
    """The largest difference between the same keys' values, relative to values above 1 (absolute below)."""
    assert one.keys() == other.keys()
    return max(abs(one[k] - other[k]) / max(1.0, abs(one[k])) for k in one)


def evaluate(loaded: LoadedModel, saes: dict, **kwargs) -> dict[str, float]:
    return evaluate_tasks(loaded.model, loaded.tokenizer, saes, TASKS, limit=LIMIT, **kwargs)


def test_an_identity_sae_gives_exactly_the_bare_models_numbers_and_a_zero_sae_degrades_them(trained):
    d = trained.model.config.hidden_size
    bare = evaluate(trained, {})
    assert evaluate(trained, {HOOK: scaled_identity(d, 1.0)}) == bare
    zero = evaluate(trained, {HOOK: scaled_identity(d, 0.0)})
    # the trained model is far from uniform (log2(259) = 8.02 bits per byte); zeroed, worse than uniform
    assert zero["saex_kjv_ppl/bits_per_byte"] > 8.02 > 4.0 > bare["saex_kjv_ppl/bits_per_byte"]
    assert zero["saex_kjv_ppl/word_perplexity"] > 10 * bare["saex_kjv_ppl/word_perplexity"]


def test_results_do_not_depend_on_the_batch_size(trained):
    sae = TopKSAE.build(trained.model.config.hidden_size, TopKSAE.Params(k=8, normalize_input=False), seed=0).eval()
    one, eight = (evaluate(trained, {HOOK: sae}, batch_size=b) for b in (1, 8))
    assert len(one) == 11 and relative_difference(one, eight) <= 1e-6


def test_the_multiple_choice_tasks_are_deterministic_for_a_seed_and_come_from_the_eval_split_only():
    chapters = list(kjv_chapters())
    eval_verses = {v for i, c in enumerate(chapters) if split_of(i) == "eval" for v in c}
    for build in (next_verse_items, cloze_items):
        items = build(7)
        assert items == build(7) and items != build(8) and len(items) > 3000
        for item in items:
            assert split_of(item["chapter"]) == "eval"
            assert all(split_of(c) == "eval" and c != item["chapter"] for c in item["distractor_chapters"])
            assert len(set(item["choices"])) == 4 and 0 <= item["gold"] < 4
        # the context and the answer are text of the item's own chapter
        first = items[0]
        chapter = " ".join(chapters[first["chapter"]])
        assert f"{first['context']} {first['choices'][first['gold']]}" in chapter
    assert all(item["context"] in eval_verses for item in next_verse_items(7))
    assert all(set(item["choices"]) <= eval_verses for item in next_verse_items(7))
    passages = perplexity_items(7)
    assert {p["chapter"] for p in passages} == {i for i in range(len(chapters)) if split_of(i) == "eval"}
    assert all(p["text"] in " ".join(chapters[p["chapter"]]) for p in passages)


def test_the_plugin_stores_lm_evals_own_numbers_and_returns_exactly_its_declared_keys(tiny_llama):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    d = tiny_llama.model.config.hidden_size
    metric = LmEval()
    params = metric.Params(limit=LIMIT)
    saes = {"a": scaled_identity(d, 1.0), "b": TopKSAE.build(d, TopKSAE.Params(k=8, normalize_input=False)).eval()}
    blocks = torch.zeros((1, 8), dtype=torch.long)
    ctx = SpliceContext(tiny_llama.model, HOOK, blocks, tiny_llama.tokenizer, torch.device("cpu"), saes)
    found = metric.compute_spliced(ctx, params)

    lm = HFLM(pretrained=tiny_llama.model, tokenizer=tiny_llama.tokenizer, batch_size=8)
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    own = simple_evaluate(model=lm, tasks=TASKS, limit=LIMIT, task_manager=manager)["results"]
    assert own["saex_kjv_next_verse"]["acc,none"] == found["b"]["saex_kjv_next_verse/acc" + CLEAN]
    assert {k.removesuffix(CLEAN): v for k, v in found["b"].items() if k.endswith(CLEAN)} == flatten(own)
    assert {k: v for k, v in found["a"].items() if not k.endswith(CLEAN)} == flatten(own)  # identity SAE
    declared = {output.name for output in metric.outputs}
    assert set(found["a"]) == set(found["b"]) == declared and len(declared) == 2 * 11  # the ppl has no stderr
    assert metric._clean[tiny_llama.model]  # the bare model ran once for both SAEs


def tiny_registry(tmp_path: Path) -> Path:
    data = {
        "matrices": {
            "lm": {
                "models": ["tiny"],
                "corpus": "kjv",
                "compressions": ["magnitude-50"],
                "hooks": ["layers.1.resid_post"],
                "saes": ["topk-tiny"],
                "metrics": ["ce-kl-small", "lm-eval-small"],
                "tokens": {"train": 8192, "calibration": 1024, "eval": 2048},
                "block_size": 64,
            }
        }
    }
    path = tmp_path / "lm.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_tiny_matrix_stores_and_reports_lm_eval_numbers_beside_kl_div_score(tmp_path):
    from saex.report import figures

    plugins = load_plugins(entry_points=False)
    registry = load_registry([PROJECT_REGISTRY, tiny_registry(tmp_path)], plugins)
    store, cache = ResultsStore(tmp_path / "r.sqlite"), Cache(tmp_path / "cache")
    results = Runner(plugins, registry, store, cache, progress=False, log=lambda m: None).run("lm")
    assert {r.status for r in results} == {"done"} and len(results) == 3
    for r in results:
        assert 0 <= r.metrics["saex_kjv_cloze/acc"] <= 1 and r.metrics["saex_kjv_ppl/bits_per_byte_clean"] > 7
    base = [r for r in results if r.cell["scored_on"] == "base"]
    compressed = [r for r in results if r.cell["scored_on"] != "base"]
    assert len({r.metrics["saex_kjv_ppl/word_perplexity_clean"] for r in base + compressed}) == 2  # M and M_c
    outputs = declared_outputs(plugins)
    report = markdown("lm", results, outputs)
    assert "saex_kjv_next_verse/acc ↑" in report and "saex_kjv_ppl/bits_per_byte_clean ↓" in report
    assert "?" not in report.split("### Every cell")[1].split("\n")[2]  # every column declared
    draws, skipped = figures.plan(results, outputs, tmp_path / "figures")
    against = [path for title, path, draw in draws if title.startswith("Against kl_div_score")]
    assert len(against) == 1 and not [title for title, _ in skipped if title.startswith("Against")]
    assert next(draw for title, path, draw in draws if path == against[0])(against[0]).stat().st_size > 10_000


def test_the_lm_eval_cli_evaluates_a_saved_sae_spliced_into_a_named_model(tmp_path, tiny_llama):
    d = tiny_llama.model.config.hidden_size
    sae = TopKSAE.build(d, TopKSAE.Params(k=8, normalize_input=False), seed=3).eval()
    save_sae(sae, tmp_path / "sae")
    expected = evaluate_tasks(tiny_llama.model, tiny_llama.tokenizer, {HOOK: sae}, ["saex_kjv_cloze"], limit=LIMIT)
    args = f"pretrained=tiny-llama,sae={tmp_path / 'sae'},hook={HOOK}"
    command = [sys.executable, "-m", "saex.cli", "lm-eval", "--model", "saex", "--model_args", args, "--tasks"]
    command += ["saex_kjv_cloze", "--limit", str(LIMIT), "--batch_size", "8", "--output_path", str(tmp_path / "out")]
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    [written] = (tmp_path / "out").rglob("results_*.json")
    assert flatten(json.loads(written.read_text())["results"]) == expected


def test_an_unknown_or_unreachable_task_is_refused_when_the_registry_is_read_naming_the_offline_tasks():
    with pytest.raises(ValidationError, match="no task, group or tag 'no_such_task'.*saex_kjv_cloze"):
        LmEval().Params(tasks=["no_such_task"])
    if hub_reachable():
        pytest.skip("the Hugging Face Hub is reachable from here")
    with pytest.raises(ValidationError, match="'arc_easy' reads allenai/ai2_arc .* cannot be reached.*saex_kjv_ppl"):
        LmEval().Params(tasks=["arc_easy"])


@pytest.mark.integration
def test_on_smollm2_task_scores_sit_beside_kl_div_score_and_splices_behave(tmp_path):
    """The real embedded model at a small budget; the printed numbers are recorded in docs/DOWNSTREAM.md."""
    data = {
        "saes": {
            "it-topk": {
                "plugin": "topk",
                "params": {"expansion_factor": 4, "k": 16},
                "training": {"tokens": 32768, "batch_size": 512, "lr": 0.001},
            }
        },
        "metrics": {"it-lm-eval": {"plugin": "lm-eval", "params": {"limit": REAL_LIMIT}}},
        "matrices": {
            "it": {
                "models": ["smollm2"],
                "corpus": "kjv",
                "compressions": ["magnitude-50"],
                "hooks": [str(REAL_HOOK)],
                "saes": ["it-topk"],
                "metrics": ["ce-kl-small", "it-lm-eval"],
                "device": "cpu",
                "tokens": {"train": 16384, "calibration": 1024, "eval": 4096},
            }
        },
    }
    extra = tmp_path / "it.yaml"
    extra.write_text(yaml.safe_dump(data))
    plugins = load_plugins(entry_points=False)
    registry = load_registry([PROJECT_REGISTRY, extra], plugins)
    runner = Runner(
        plugins, registry, ResultsStore(tmp_path / "r.sqlite"), Cache(tmp_path / "cache"), progress=False, log=print
    )
    start = time.perf_counter()
    results = {(r.cell["source"], r.cell["scored_on"]): r for r in runner.run("it")}
    print(f"matrix: {time.perf_counter() - start:.0f} s")
    assert {r.status for r in results.values()} == {"done"} and len(results) == 3
    for (source, scored_on), r in results.items():
        shown = {k: round(v, 4) for k, v in r.metrics.items() if "/" in k and "stderr" not in k}
        print(source, scored_on, f"kl_div_score {r.metrics['kl_div_score']:.4f}", shown)
    on_m = results[("original", "base")].metrics
    # SmolLM2 knows the KJV: far above chance (0.25) on cloze, about a bit per byte
    assert on_m["saex_kjv_cloze/acc_clean"] > 0.6 and on_m["saex_kjv_ppl/bits_per_byte_clean"] < 1.5
    for r in results.values():  # an imperfect SAE costs perplexity
        assert r.metrics["saex_kjv_ppl/bits_per_byte"] > r.metrics["saex_kjv_ppl/bits_per_byte_clean"]

    loaded = SMOLLM2.load(SMOLLM2.Params(), torch.device("cpu"))
    model, tokenizer, d = loaded.model, loaded.tokenizer, loaded.model.config.hidden_size
    cloze = lambda saes: evaluate_tasks(model, tokenizer, saes, ["saex_kjv_cloze"], limit=REAL_LIMIT)
    bare, zero = cloze({}), cloze({REAL_HOOK: scaled_identity(d, 0.0)})
    assert cloze({REAL_HOOK: scaled_identity(d, 1.0)}) == bare
    print("bare", bare, "zero SAE", zero)
    assert zero["saex_kjv_cloze/acc"] < bare["saex_kjv_cloze/acc"] - 0.3

    shrunk = {REAL_HOOK: scaled_identity(d, 0.9)}  # a perturbation of an SAE's size: bits per byte +3%
    one, eight = (
        evaluate_tasks(model, tokenizer, shrunk, ["saex_kjv_cloze", "saex_kjv_ppl"], limit=10, batch_size=b)
        for b in (1, 8)
    )
    print(f"batch 1 vs 8: largest relative difference {relative_difference(one, eight):.2e}", one)
    assert relative_difference(one, eight) <= 1e-6
