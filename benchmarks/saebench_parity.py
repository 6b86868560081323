"""saex.analysis.probing against SAEBench 0.6.0's own functions, on the same constructed activations.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python benchmarks/saebench_parity.py [--venv DIR]

A script, not a test (no ``test_`` prefix; pytest collects only tests/). It builds a plain venv in a temporary folder
(``--venv DIR`` builds it there, or reuses it, and keeps it) with ``pip install --no-deps sae-bench==0.6.0`` and the
packages the SAEBench modules used here import, pinned to this venv's versions so both sides do the same floating
point (``PINNED``: torch, numpy, scikit-learn, scipy, einops, jaxtyping, pandas, pydantic, tqdm, tabulate), plus
beartype 0.17.2 (``BEARTYPE``: later releases break SAEBench's top-k sparse probing). It also downloads the sae-bench
0.4.0 wheel for that release's FeatureAbsorptionCalculator (the older absorption formula).

SAEBench's modules import sae_lens, transformer_lens, transformers and datasets at their top, but the functions called
here use them only in annotations and an SAE-directory listing at import; the SAEBench side puts empty stand-in
modules in their place instead of installing them (they would bring model hubs and GPU builds). SAEs and models are
small stand-in objects with the attributes SAEBench reads (encode, decode, W_dec, dtype, device, cfg.d_sae;
run_with_cache, to_tokens).

This file runs twice: here, where it writes the inputs (.npz) and runs saex, and in the throwaway venv with
``--saebench-side INPUTS OUTPUTS CALCULATOR_040``, where it runs SAEBench and writes JSON. No pickle crosses.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import zipfile
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

SEED = 42
KS = (1, 2, 5)
TPP_NS = (2, 5, 10, 20)  # SAEBench's n values above d_sae (48 here) fail its assertion
SCR_KEYS = [  # dataset_info.PAIRED_CLASS_KEYS, each class followed by its pair
    "male / female",
    "female_data_only",
    "professor / nurse",
    "nurse_data_only",
    "male_professor / female_nurse",
    "female_nurse_data_only",
]
PINNED = ["torch", "numpy", "scikit-learn", "scipy", "einops", "jaxtyping", "pandas", "pydantic", "tqdm", "tabulate"]
# beartype 0.18 and later type-check a value of train_probe_on_activations' per-class dict, which binds jaxtyping's
# train_dataset_size to one class's size; the nested train_sklearn_probe call on the balanced 2x sample then fails
# (BeartypeCallHintParamViolation), so SAEBench 0.6.0's top-k sparse probing runs only with beartype <= 0.17.
BEARTYPE = "beartype==0.17.2"
SAE_BATCH = 125  # ScrAndTppEvalConfig.sae_batch_size
ABSORPTION_BATCH = 10  # FeatureAbsorptionCalculator.batch_size
LETTERS = "abcdefghijklmnopqrstuvwxyz"


# ----- the inputs -----


def make_inputs() -> dict[str, np.ndarray]:
    """Random activations with planted class directions, a ReLU SAE, and the absorption and k-sparse data."""
    rng = np.random.default_rng(0)
    d, d_sae, seq = 16, 48, 8

    def tokens(n_per_class: int, directions: np.ndarray, shift: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        labels = np.repeat(np.arange(len(directions)), n_per_class)
        acts = rng.normal(size=(len(labels), seq, d)) + shift * directions[labels][:, None, :]
        mask = rng.random((len(labels), seq)) > 0.25
        mask[:, 0] = False  # BOS
        mask[:, 1] = True
        acts = acts * mask[:, :, None]  # SAEBench zeroes special tokens' activations before pooling
        return acts.astype(np.float32), mask, labels

    inputs: dict[str, np.ndarray] = {}
    directions = rng.normal(size=(4, d))
    for split, n in (("train", 40), ("test", 20)):
        inputs[f"{split}_acts"], inputs[f"{split}_mask"], inputs[f"{split}_labels"] = tokens(n, directions, 0.6)
    inputs["scr_acts"], inputs["scr_mask"], inputs["scr_labels"] = tokens(30, rng.normal(size=(6, d)), 0.8)
    w_enc = rng.normal(size=(d, d_sae)) / np.sqrt(d)
    inputs["w_enc"] = w_enc.astype(np.float32)
    inputs["b_enc"] = rng.uniform(-0.4, -0.05, d_sae).astype(np.float32)  # < 0: encode(0) = 0 (see ablate_pooled)
    inputs["w_dec"] = (w_enc.T / np.linalg.norm(w_enc.T, axis=1, keepdims=True)).astype(np.float32)
    inputs["b_dec"] = np.zeros(d, np.float32)
    inputs["effect_probes"] = rng.normal(size=(3, d)).astype(np.float32)

    # absorption: 22 letters, 12 words each, main latents [L] or [L, 22 + L], absorbers among latents 44..63
    a_d, a_sae, n_letters, n_words = 24, 64, 22, 12
    a_dec = rng.normal(size=(a_sae, a_d))
    a_dec /= np.linalg.norm(a_dec, axis=1, keepdims=True)
    words, acts, letters = [], [], []
    for letter in range(n_letters):
        for j in range(n_words):
            words.append(LETTERS[letter] + "abcdefghijkl"[j] + "mnop"[j % 4])
            main_on = rng.random() > 0.3
            absorber = rng.integers(44, a_sae)
            acts.append(
                main_on * 1.5 * a_dec[letter] + rng.uniform(0, 2) * a_dec[absorber] + 0.2 * rng.normal(size=a_d)
            )
            letters.append(letter)
    inputs["abs_words"] = np.array(words)
    inputs["abs_acts"] = np.array(acts, np.float32)
    inputs["abs_letters"] = np.array(letters)
    inputs["abs_w_dec"] = a_dec.astype(np.float32)
    inputs["abs_w_enc"] = a_dec.T.astype(np.float32)
    inputs["abs_b_enc"] = rng.uniform(-0.3, -0.05, a_sae).astype(np.float32)
    inputs["abs_probes"] = (a_dec[:n_letters] + 0.3 * rng.normal(size=(n_letters, a_d))).astype(np.float32)
    inputs["abs_main"] = np.array([[i, 22 + i] if i % 2 else [i, -1] for i in range(n_letters)])
    inputs["abs_probe_f1"] = rng.uniform(0.65, 1.0, n_letters)
    inputs["abs_probe_f1"][[3, 10]] = 0.5  # two letters under min_GT_probe_f1, leaving SAEBench's minimum of 20

    # k-sparse probing: 10 letters, 30 words each; latents with one planted latent per letter, ground-truth activations
    k_labels = np.repeat(np.arange(10), 30)
    k_latents = np.maximum(rng.normal(size=(len(k_labels), 40)) - 1.0, 0.0)
    k_latents[np.arange(len(k_labels)), 3 * k_labels] += 2.0
    inputs["ks_labels"], inputs["ks_latents"] = k_labels, k_latents.astype(np.float32)
    inputs["ks_acts"] = (np.eye(10, 24)[k_labels] * 2.0 + 0.5 * rng.normal(size=(len(k_labels), 24))).astype(np.float32)

    # formulas on random numbers: feature splitting, TPP and SCR accuracies (ties and small gaps included)
    inputs["split_f1"] = np.sort(rng.uniform(0.3, 0.9, (26, 5)), axis=1) * rng.choice([1.0, 1.04], (26, 5))
    inputs["split_feats"] = rng.integers(0, 100, (26, 5, 5))
    inputs["tpp_clean"] = rng.uniform(0.6, 1.0, 4)
    inputs["tpp_ablated"] = rng.uniform(0.4, 1.0, (4, 3, 4))
    scr = rng.uniform(0.5, 1.0, (6, 8))
    scr[1, 3] = scr[1, 2]  # a tie between the biased probe's two accuracies: no scr_metric
    scr[2, 0] = scr[2, 2] + 0.0005  # a clean gap under 0.001 (direction 1)
    inputs["scr_accs"] = scr
    inputs["vocab"] = np.array([" apple", "Banana", "cat", " 12", "a-b", "", " dog", "  two", "x", "Ünder", " Zed"])
    return inputs


# ----- the SAEBench side (runs in the throwaway venv) -----


def _stub_unused_modules() -> None:
    import types

    class Placeholder:
        pass

    stubs = {
        "sae_lens": {"SAE": Placeholder},
        "sae_lens.loading": {},
        "sae_lens.loading.pretrained_saes_directory": {"get_pretrained_saes_directory": dict},
        "sae_lens.saes": {},
        "sae_lens.saes.sae": {"SAEMetadata": Placeholder},
        "transformer_lens": {"HookedTransformer": Placeholder},
        "transformers": {
            name: Placeholder
            for name in ("AutoTokenizer", "BatchEncoding", "PreTrainedModel", "PreTrainedTokenizerFast")
        },
        "transformers.tokenization_utils_fast": {"PreTrainedTokenizerFast": Placeholder},
        "datasets": {"load_dataset": None},
    }
    for name, attributes in stubs.items():
        module = types.ModuleType(name)
        module.__dict__.update(attributes)
        sys.modules[name] = module


class StandInSAE:
    """A ReLU SAE with the attributes SAEBench reads."""

    def __init__(self, w_enc: torch.Tensor, b_enc: torch.Tensor, w_dec: torch.Tensor, b_dec: torch.Tensor) -> None:
        from types import SimpleNamespace

        self.W_enc, self.b_enc, self.W_dec, self.b_dec = w_enc, b_enc, w_dec, b_dec
        self.dtype, self.device, self.cfg = torch.float32, torch.device("cpu"), SimpleNamespace(d_sae=w_dec.shape[0])

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec


def saebench_side(inputs_path: Path, outputs_path: Path, calculator_040: Path) -> None:
    """Run SAEBench's functions on the inputs and write their results as JSON."""
    import contextlib
    import importlib.util
    import os
    import random
    import statistics
    from types import SimpleNamespace

    _stub_unused_modules()
    import pandas as pd
    import sae_bench.evals.absorption.feature_absorption_calculator as calculator_new
    import sae_bench.evals.absorption.main as absorption_main
    import sae_bench.evals.absorption.probing as absorption_probing
    import sae_bench.evals.scr_and_tpp.main as scr_tpp
    import sae_bench.evals.sparse_probing.probe_training as probe_training
    import sae_bench.sae_bench_utils.activation_collection as collection
    from sae_bench.evals.absorption.k_sparse_probing import add_feature_splits_to_metrics_df, train_k_sparse_probes
    from sae_bench.evals.absorption.prompting import create_icl_prompt, first_letter_formatter
    from sae_bench.evals.absorption.vocab import get_alpha_tokens

    spec = importlib.util.spec_from_file_location("calculator_040", calculator_040)
    calculator_old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(calculator_old)

    data = {key: torch.from_numpy(value) for key, value in np.load(inputs_path).items() if value.dtype.kind != "U"}
    strings = {key: value.tolist() for key, value in np.load(inputs_path).items() if value.dtype.kind == "U"}
    sae = StandInSAE(data["w_enc"], data["b_enc"], data["w_dec"], data["b_dec"])
    out: dict = {}

    def by_class(x: torch.Tensor, labels: torch.Tensor, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        classes = sorted(set(labels.tolist()))
        return {(names[c] if names else str(c)): x[labels == c] for c in classes}

    train_bld = by_class(data["train_acts"], data["train_labels"])
    test_bld = by_class(data["test_acts"], data["test_labels"])
    scr_bld = by_class(data["scr_acts"], data["scr_labels"], SCR_KEYS)

    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        # pooling
        out["pool_x"] = torch.cat(list(collection.create_meaned_model_activations(train_bld).values())).tolist()
        out["pool_f"] = torch.cat(
            list(collection.get_sae_meaned_activations(train_bld, sae, SAE_BATCH).values())
        ).tolist()

        # balanced samples: rows carry their own index, so the sample is read back as indices
        def indexed(labels: torch.Tensor, names: list[str] | None = None) -> dict[str, torch.Tensor]:
            return by_class(torch.arange(len(labels), dtype=torch.float32)[:, None], labels, names)

        torch.manual_seed(SEED)
        out["sample_tpp"] = [
            [t.reshape(-1).long().tolist() for t in probe_training.prepare_probe_data(indexed(data["train_labels"]), c)]
            for c in map(str, range(4))
        ]
        torch.manual_seed(SEED)
        out["sample_scr"] = [
            [
                t.reshape(-1).long().tolist()
                for t in probe_training.prepare_probe_data(indexed(data["scr_labels"], SCR_KEYS), key, perform_scr=True)
            ]
            for key in SCR_KEYS[::2]
        ]

        # top-k mean difference and the sklearn probe, on balanced samples of the pooled latents
        pooled_f = collection.get_sae_meaned_activations(train_bld, sae, SAE_BATCH)
        pooled_f_test = collection.get_sae_meaned_activations(test_bld, sae, SAE_BATCH)
        torch.manual_seed(SEED)
        out["top_k"], out["sklearn"] = [], []
        for c in pooled_f:
            x, y = probe_training.prepare_probe_data(pooled_f, c)
            tx, ty = probe_training.prepare_probe_data(pooled_f_test, c)
            out["top_k"].append(
                [
                    torch.nonzero(~probe_training.get_top_k_mean_diff_mask(x, y, k)).squeeze(1).tolist()
                    for k in (1, 2, 5, 20)
                ]
            )
            probe, accuracy = probe_training.train_sklearn_probe(x, y, tx, ty)
            out["sklearn"].append(
                {"accuracy": accuracy, "coef": probe.coef_[0].tolist(), "bias": float(probe.intercept_[0])}
            )

        # sparse probing: run_eval_single_dataset's sequence, model then SAE on one generator
        llm_train, llm_test = (collection.create_meaned_model_activations(bld) for bld in (train_bld, test_bld))
        torch.manual_seed(SEED)
        sparse = {}
        for name, train, test in (("llm", llm_train, llm_test), ("sae", pooled_f, pooled_f_test)):
            _, full = probe_training.train_probe_on_activations(
                train, test, select_top_k=None, use_sklearn=False, batch_size=250, epochs=100, lr=1e-2
            )
            sparse[f"{name}_test_accuracy"] = full
            for k in KS:
                _, sparse[f"{name}_top_{k}_test_accuracy"] = probe_training.train_probe_on_activations(
                    train, test, select_top_k=k
                )
        out["sparse"] = sparse

        # latent effects, top-n selection and ablation with fixed probes
        effects = []
        for mode, bld, keys in (("tpp", train_bld, [str(c) for c in range(4)]), ("scr", scr_bld, SCR_KEYS[::2])):
            for i, weight in enumerate(data["effect_probes"]):
                probe = probe_training.Probe(weight.shape[0], torch.float32)  # its initialisation draws: seed after
                probe.net.weight.data = weight[None].clone()
                torch.manual_seed(100 + i)
                for key in keys:
                    effect = scr_tpp.get_effects_per_class_precomputed_acts(
                        sae, probe, key, bld, mode == "scr", SAE_BATCH
                    )
                    masks = [scr_tpp.select_top_n_features(effect, n, key) for n in TPP_NS]
                    ablated = scr_tpp.ablated_precomputed_activations(test_bld["0"], sae, masks[1], SAE_BATCH)
                    effects.append(
                        {
                            "effects": effect.tolist(),
                            "top_n": [torch.nonzero(m).squeeze(1).tolist() for m in masks],
                            "ablated": ablated.tolist(),
                        }
                    )
        out["effects"] = effects

        # TPP: run_eval_single_dataset with perform_scr=False
        torch.manual_seed(SEED)
        train_means = collection.create_meaned_model_activations(train_bld)
        test_means = collection.create_meaned_model_activations(test_bld)
        torch.set_grad_enabled(True)
        probes, _ = probe_training.train_probe_on_activations(
            train_means,
            test_means,
            select_top_k=None,
            use_sklearn=False,
            batch_size=16,
            epochs=20,
            lr=1e-3,
            perform_scr=False,
            early_stopping_patience=20,
            l1_penalty=1e-3,
        )
        torch.set_grad_enabled(False)
        classes = list(train_bld)
        clean = scr_tpp.get_probe_test_accuracy(probes, classes, test_means, 500, False)
        node_effects = scr_tpp.get_all_node_effects_for_one_sae(sae, probes, classes, False, train_bld, SAE_BATCH)
        ablated = scr_tpp.perform_feature_ablations(
            probes, sae, SAE_BATCH, test_bld, node_effects, list(TPP_NS), classes, 500, False
        )
        out["tpp"] = scr_tpp.create_tpp_plotting_dict(ablated, clean)[0]
        torch.set_grad_enabled(True)

        # TPP and SCR formulas on random accuracies
        clean = {str(c): float(a) for c, a in enumerate(data["tpp_clean"])}
        accs = {
            str(a): {
                n: {str(c): float(data["tpp_ablated"][a, i, c]) for c in range(4)} for i, n in enumerate((2, 5, 9))
            }
            for a in range(4)
        }
        out["tpp_formula"] = scr_tpp.create_tpp_plotting_dict(accs, clean)
        out["scr_formula"] = []
        biased = "male_professor / female_nurse probe on "
        for row in data["scr_accs"].tolist():
            llm_clean = {
                "professor / nurse": row[0],
                "male / female": row[1],
                biased + "professor / nurse data": row[2],
                biased + "male / female data": row[3],
            }
            class_accs = {
                "male / female": {
                    2: {biased + "professor / nurse data": row[4]},
                    20: {biased + "professor / nurse data": row[5]},
                },
                "professor / nurse": {
                    2: {biased + "male / female data": row[6]},
                    20: {biased + "male / female data": row[7]},
                },
            }
            out["scr_formula"].append(scr_tpp.get_scr_plotting_dict(class_accs, llm_clean))

        # absorption: both releases' calculators, per letter, and run_eval's aggregation
        words, letters = strings["abs_words"], data["abs_letters"]
        lookup = {w: data["abs_acts"][i] for i, w in enumerate(words)}

        class StandInModel:
            def run_with_cache(self, prompts: list[str], names_filter: list[str]) -> tuple[None, dict]:
                rows = torch.stack([lookup[p.split("\n")[-1][:-1]] for p in prompts])
                return None, {names_filter[0]: rows[:, None, :].expand(-1, 3, -1)}

            def to_tokens(self, prompt: str) -> torch.Tensor:
                return torch.zeros(1, 3, dtype=torch.long)

        abs_sae = StandInSAE(data["abs_w_enc"], data["abs_b_enc"], data["abs_w_dec"], torch.zeros(24))
        absorption = {"0.4.1": [], "0.4.0": []}
        raw = []
        for letter in range(len(data["abs_probes"])):
            letter_words = [w for w, lt in zip(words, letters.tolist()) if lt == letter]
            main = [i for i in data["abs_main"][letter].tolist() if i >= 0]
            for release, module in (("0.4.1", calculator_new), ("0.4.0", calculator_old)):
                calculator = module.FeatureAbsorptionCalculator(
                    model=StandInModel(), icl_word_list=words, max_icl_examples=3, batch_size=ABSORPTION_BATCH
                )
                result = calculator.calculate_absorption(
                    abs_sae, letter_words, data["abs_probes"][letter], main, layer=0, show_progress=False
                )
                absorption[release].append(
                    [[float(r.absorption_fraction), bool(r.is_full_absorption)] for r in result.word_results]
                )
                if release == "0.4.1":
                    raw += [
                        {
                            "letter": LETTERS[letter],
                            "absorption_fraction": r.absorption_fraction,
                            "is_full_absorption": r.is_full_absorption,
                            "num_probe_true_positives": len(letter_words),
                            "split_feats": main,
                        }
                        for r in result.word_results
                    ]
        out["absorption"] = absorption
        agg = absorption_main._aggregate_results_df(pd.DataFrame(raw))
        f1 = {LETTERS[i]: f for i, f in enumerate(data["abs_probe_f1"].tolist())}
        kept = agg[agg["letter"].map(f1) > 0.6]  # run_eval's min_GT_probe_f1 filter
        out["absorption_metrics"] = {}
        for name, column in (
            ("absorption_fraction_score", "mean_absorption_fraction"),
            ("full_absorption_score", "full_absorption_rate"),
            ("num_split_features", "num_split_feats"),
        ):
            values = kept[column].tolist()
            out["absorption_metrics"][f"mean_{name}"] = float(statistics.mean(values))
            out["absorption_metrics"][f"std_dev_{name}"] = float(statistics.stdev(values))

        # k-sparse probing (precomputed latents through an identity SAE) and the ground-truth probe
        identity = SimpleNamespace(
            encode=lambda x: x, device=torch.device("cpu"), dtype=torch.float32, cfg=SimpleNamespace(d_sae=40)
        )
        labels = data["ks_labels"]
        torch.manual_seed(SEED)
        k_probes = train_k_sparse_probes(
            identity,
            [(str(i), int(c)) for i, c in enumerate(labels)],
            data["ks_latents"],
            ks=[1, 2, 3],
            batch_size=64,
            precalc_sae_acts=True,
        )
        out["k_sparse"] = {
            str(k): {
                str(c): [p.feature_ids.tolist(), p.weight.tolist(), p.bias.item()] for c, p in sorted(by_letter.items())
            }
            for k, by_letter in k_probes.items()
        }
        torch.manual_seed(SEED)
        ground_truth = absorption_probing.train_multi_probe(
            data["ks_acts"],
            torch.nn.functional.one_hot(labels, 10),
            num_probes=10,
            batch_size=64,
            num_epochs=50,
            lr=1e-2,
            weight_decay=1e-4,
            show_progress=False,
            device=torch.device("cpu"),
        )
        out["ground_truth"] = [ground_truth.weights.tolist(), ground_truth.biases.tolist()]

        # feature splitting, prompts and the vocabulary filter
        frame = pd.DataFrame({"letter": list(LETTERS)})
        for k in range(1, 6):
            frame[f"f1_sparse_sae_{k}"] = data["split_f1"][:, k - 1].numpy()
            feats = np.empty(26, dtype=object)
            feats[:] = [row[k - 1, :k].numpy() for row in data["split_feats"]]
            frame[f"sparse_sae_k_{k}_feats"] = feats
        add_feature_splits_to_metrics_df(frame, max_k_value=5, f1_jump_threshold=0.03)
        out["splits"] = [list(map(int, feats)) for feats in frame["split_feats"]]
        random.seed(3)
        out["prompts"] = [
            create_icl_prompt(
                w,
                words,
                base_template="{word} has the first letter:",
                answer_formatter=first_letter_formatter(),
                max_icl_examples=10,
                prepend_separator_to_first_example=True,
            ).base
            for w in words[:20]
        ]
        tokenizer = SimpleNamespace(
            vocab={t: i for i, t in enumerate(strings["vocab"])},
            convert_tokens_to_string=lambda tokens: "".join(tokens),
        )
        out["vocab"] = get_alpha_tokens(tokenizer)
    outputs_path.write_text(json.dumps(out))


# ----- the saex side and the comparison -----


def build_venv(venv: Path) -> Path:
    """A plain venv with sae-bench 0.6.0 (no dependencies) and the packages its imported modules need."""
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pins = [f"{name}=={version(name).split('+')[0]}" for name in PINNED] + [BEARTYPE]
        subprocess.run([str(python), "-m", "pip", "install", "-q", *pins], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "sae-bench==0.6.0"], check=True)
    return python


def calculator_040(python: Path, folder: Path) -> Path:
    """sae-bench 0.4.0's feature_absorption_calculator.py, out of its wheel."""
    target = folder / "feature_absorption_calculator_040.py"
    if not target.exists():
        wheels = folder / "wheels"
        subprocess.run(
            [str(python), "-m", "pip", "download", "-q", "--no-deps", "sae-bench==0.4.0", "-d", str(wheels)], check=True
        )
        with zipfile.ZipFile(next(wheels.glob("sae_bench-0.4.0-*.whl"))) as wheel:
            target.write_bytes(wheel.read("sae_bench/evals/absorption/feature_absorption_calculator.py"))
    return target


def max_diff(a: object, b: object) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)), initial=0.0))


def compare(inputs: dict[str, np.ndarray], ref: dict) -> list[tuple[str, str, str]]:
    """Run saex on the inputs and set each result against SAEBench's: (what, SAEBench function, agreement)."""
    import random

    from saex.analysis import probing

    t = {key: torch.from_numpy(value) for key, value in inputs.items() if value.dtype.kind != "U"}
    words, vocab = inputs["abs_words"].tolist(), inputs["vocab"].tolist()
    w_enc, b_enc, w_dec = t["w_enc"], t["b_enc"], t["w_dec"]

    def encode(x: torch.Tensor) -> torch.Tensor:
        return torch.relu((x - t["b_dec"]) @ w_enc + b_enc)

    def pooled(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        acts, mask = t[f"{split}_acts"], t[f"{split}_mask"]
        return probing.mean_pool(acts, mask), probing.mean_pool(encode(acts), mask)

    (px, pf), (px_test, pf_test) = pooled("train"), pooled("test")
    y, y_test = t["train_labels"], t["test_labels"]
    rows = []

    def add(what: str, reference: str, agreement: str) -> None:
        rows.append((what, reference, agreement))

    add(
        "mean_pool, model activations",
        "create_meaned_model_activations",
        f"max |diff| {max_diff(px, ref['pool_x']):.1e}",
    )
    add("mean_pool, SAE latents", "get_sae_meaned_activations", f"max |diff| {max_diff(pf, ref['pool_f']):.1e}")

    gen = torch.Generator().manual_seed(SEED)
    same = [
        [r.tolist(), tg.tolist()] == ref_sample
        for c, ref_sample in zip(range(4), ref["sample_tpp"])
        for r, tg in [probing.balanced_one_vs_rest(y, c, gen)]
    ]
    add("balanced_one_vs_rest", "prepare_probe_data", f"identical rows and order {sum(same)}/{len(same)} classes")
    gen = torch.Generator().manual_seed(SEED)
    same = [
        [r.tolist(), tg.tolist()] == ref_sample
        for c, ref_sample in zip((0, 2, 4), ref["sample_scr"])
        for r, tg in [probing.balanced_one_vs_rest(t["scr_labels"], c, gen, paired=c + 1)]
    ]
    add(
        "balanced_one_vs_rest(paired=)", "prepare_probe_data(perform_scr)", f"identical {sum(same)}/{len(same)} classes"
    )

    gen = torch.Generator().manual_seed(SEED)
    top_k_same, acc_same, coef_diff = 0, 0, 0.0
    for c in range(4):
        train_rows, train_y = probing.balanced_one_vs_rest(y, c, gen)
        test_rows, test_y = probing.balanced_one_vs_rest(y_test, c, gen)
        x = pf[train_rows]
        for k, expected in zip((1, 2, 5, 20), ref["top_k"][c]):
            top_k_same += sorted(probing.top_k_mean_diff(x, train_y, k).tolist()) == expected
        fit = probing.train_probe(x, train_y, pf_test[test_rows], test_y)
        acc_same += fit.test_accuracy == ref["sklearn"][c]["accuracy"]
        coef_diff = max(
            coef_diff, max_diff(fit.weight, ref["sklearn"][c]["coef"]), max_diff(fit.bias, ref["sklearn"][c]["bias"])
        )
    add("top_k_mean_diff (k = 1, 2, 5, 20)", "get_top_k_mean_diff_mask", f"same indices {top_k_same}/16")
    add("train_probe", "train_sklearn_probe", f"same test accuracy {acc_same}/4; max |coef diff| {coef_diff:.1e}")

    gen = torch.Generator().manual_seed(SEED)
    ours = {"llm": probing.sparse_probing(px, y, px_test, y_test, KS, gen)}
    ours["sae"] = probing.sparse_probing(pf, y, pf_test, y_test, KS, gen)
    equal, total, worst = 0, 0, 0.0
    for key, per_class in ref["sparse"].items():
        name, metric = key.split("_", 1)
        for c, accuracy in per_class.items():
            mine = ours[name]["per_class"][metric][int(c)]
            equal, total, worst = equal + (mine == accuracy), total + 1, max(worst, abs(mine - accuracy))
    means = "; ".join(
        f"{n} {ours[n]['test_accuracy']:.3f}/{ours[n]['top_1_test_accuracy']:.3f}" for n in ("llm", "sae")
    )
    add(
        "sparse_probing (full width + top 1, 2, 5)",
        "train_probe_on_activations x4 per representation",
        f"identical {equal}/{total} per-class accuracies, max |diff| {worst:.1e} (full/top-1 means: {means})",
    )

    effect_diff, top_same, top_total, ablate_diff = 0.0, 0, 0, 0.0
    references = iter(ref["effects"])
    for mode, labels, classes in (("tpp", y, range(4)), ("scr", t["scr_labels"], (0, 2, 4))):
        latents = pf if mode == "tpp" else probing.mean_pool(encode(t["scr_acts"]), t["scr_mask"])
        for i, weight in enumerate(t["effect_probes"]):
            gen = torch.Generator().manual_seed(100 + i)
            for c in classes:
                expected = next(references)
                sample, targets = probing.balanced_one_vs_rest(labels, c, gen, paired=c + 1 if mode == "scr" else None)
                effects = probing.latent_effects(latents[sample], targets, weight, w_dec, scr=mode == "scr")
                effect_diff = max(effect_diff, max_diff(effects, expected["effects"]))
                chosen = [sorted(probing.top_n_latents(torch.tensor(expected["effects"]), n).tolist()) for n in TPP_NS]
                top_same, top_total = top_same + sum(a == b for a, b in zip(chosen, expected["top_n"])), top_total + 4
                test0 = y_test == 0
                ablated = probing.ablate_pooled(
                    px_test[test0], pf_test[test0], w_dec, torch.tensor(expected["top_n"][1])
                )
                ablate_diff = max(ablate_diff, max_diff(ablated, expected["ablated"]))
    add("latent_effects (TPP and SCR)", "get_effects_per_class_precomputed_acts", f"max |diff| {effect_diff:.1e}")
    add("top_n_latents", "select_top_n_features", f"same latents {top_same}/{top_total}")
    add("ablate_pooled", "ablated_precomputed_activations", f"max |diff| {ablate_diff:.1e}")

    tpp_means, _ = probing.tpp(px, pf, y, px_test, pf_test, y_test, w_dec, TPP_NS, seed=SEED)
    same = sum(tpp_means[key] == value for key, value in ref["tpp"].items())
    worst = max_diff([tpp_means[key] for key in ref["tpp"]], list(ref["tpp"].values()))
    add(
        "tpp pipeline",
        "run_eval_single_dataset (TPP) + create_tpp_plotting_dict",
        f"identical {same}/{len(ref['tpp'])} metrics, max |diff| {worst:.1e}"
        f" (total_metric at n=20: {tpp_means['tpp_threshold_20_total_metric']:.4f})",
    )

    clean = dict(enumerate(inputs["tpp_clean"].tolist()))
    accs = {
        a: {n: dict(enumerate(inputs["tpp_ablated"][a, i].tolist())) for i, n in enumerate((2, 5, 9))} for a in range(4)
    }
    means, per_class = probing.tpp_metrics(clean, accs)
    same = means == ref["tpp_formula"][0] and {str(c): m for c, m in per_class.items()} == ref["tpp_formula"][1]
    add("tpp_metrics", "create_tpp_plotting_dict", "identical" if same else "DIFFERENT")
    same = 0
    for row, expected in zip(inputs["scr_accs"].tolist(), ref["scr_formula"]):
        ours_scr = probing.scr_metrics(
            target_probe_accuracy=row[0],
            spurious_probe_accuracy=row[1],
            biased_on_target=row[2],
            biased_on_spurious=row[3],
            ablated_biased_on_target={2: row[4], 20: row[5]},
            ablated_biased_on_spurious={2: row[6], 20: row[7]},
        )
        same += ours_scr == expected
    add(
        "scr_metrics (incl. a tie, a gap < 0.001)",
        "get_scr_plotting_dict",
        f"identical {same}/{len(ref['scr_formula'])}",
    )

    # absorption
    abs_acts, abs_letters = t["abs_acts"], t["abs_letters"]
    abs_w_dec = t["abs_w_dec"]
    results, main_ids, branch = {}, {}, {"0": 0, "1": 0, "partial": 0, "full": 0}
    for release in ("0.4.1", "0.4.0"):
        exact, total, worst, full_same = 0, 0, 0.0, 0
        for letter, expected in enumerate(ref["absorption"][release]):
            acts = abs_acts[abs_letters == letter]
            latents = torch.cat(
                [
                    torch.relu(acts[i : i + ABSORPTION_BATCH] @ t["abs_w_enc"] + t["abs_b_enc"])
                    for i in range(0, len(acts), ABSORPTION_BATCH)
                ]
            )
            main = [i for i in inputs["abs_main"][letter].tolist() if i >= 0]
            result = probing.absorption(acts, latents, t["abs_probes"][letter], abs_w_dec, main, formula=release)
            fractions = [e[0] for e in expected]
            exact += sum(a == b for a, b in zip(result.fraction.tolist(), fractions))
            full_same += sum(a == e[1] for a, e in zip(result.full.tolist(), expected))
            total += len(expected)
            worst = max(worst, max_diff(result.fraction, fractions))
            if release == "0.4.1":
                results[letter], main_ids[letter] = result, main
                for f in fractions:
                    branch["0" if f == 0 else "1" if f == 1 else "partial"] += 1
                branch["full"] += sum(e[1] for e in expected)
        counts = (
            f" (fractions 0/1/partial: {branch['0']}/{branch['1']}/{branch['partial']}, full: {branch['full']})"
            if release == "0.4.1"
            else ""
        )
        add(
            f"absorption(formula={release!r})",
            f"FeatureAbsorptionCalculator, sae-bench {'0.6.0' if release == '0.4.1' else '0.4.0'}",
            f"identical fractions {exact}/{total}, max |diff| {worst:.1e}; same full absorption {full_same}/{total}"
            + counts,
        )
    metrics = probing.absorption_metrics(results, main_ids, dict(enumerate(inputs["abs_probe_f1"].tolist())))
    add(
        "absorption_metrics",
        "run_eval + _aggregate_results_df",
        f"max |diff| {max_diff(list(metrics.values()), [ref['absorption_metrics'][k] for k in metrics]):.1e}"
        f" (mean_absorption_fraction_score {metrics['mean_absorption_fraction_score']:.4f})",
    )

    labels = t["ks_labels"]
    l1_w, _ = probing.train_multi_probe(
        t["ks_latents"], labels, 10, seed=SEED, batch_size=64, num_epochs=50, l1_decay=0.01
    )
    probes = probing.k_sparse_probes(t["ks_latents"], labels, l1_w, (1, 2, 3))
    ids_same, weight_diff = 0, 0.0
    for k, by_letter in probes.items():
        for c, probe in by_letter.items():
            ids, weight, bias = ref["k_sparse"][str(k)][str(c)]
            ids_same += probe.feature_ids.tolist() == ids
            weight_diff = max(weight_diff, max_diff(probe.weight, weight), max_diff(probe.bias, bias))
    add(
        "train_multi_probe(l1_decay) + k_sparse_probes",
        "train_k_sparse_probes",
        f"same latents {ids_same}/30, max |weight diff| {weight_diff:.1e}",
    )
    gt_w, gt_b = probing.train_multi_probe(
        t["ks_acts"], labels, 10, seed=SEED, batch_size=64, num_epochs=50, weight_decay=1e-4
    )
    diff = max(max_diff(gt_w, ref["ground_truth"][0]), max_diff(gt_b, ref["ground_truth"][1]))
    add("train_multi_probe (ground truth)", "probing.train_multi_probe", f"max |weight diff| {diff:.1e}")

    splits = [
        probing.split_features(
            dict(enumerate(inputs["split_f1"][i].tolist(), 1)),
            {k: inputs["split_feats"][i, k - 1, :k].tolist() for k in range(1, 6)},
        )
        for i in range(26)
    ]
    add(
        "split_features",
        "add_feature_splits_to_metrics_df",
        f"identical {sum(a == b for a, b in zip(splits, ref['splits']))}/26",
    )
    rng = random.Random(3)
    prompts = [probing.icl_prompt(w, words, rng) for w in words[:20]]
    add("icl_prompt", "create_icl_prompt", f"identical {sum(a == b for a, b in zip(prompts, ref['prompts']))}/20")
    alpha = [w for w in vocab if probing.is_alpha_word(w)]
    add(
        "is_alpha_word",
        "get_alpha_tokens",
        "identical" if alpha == ref["vocab"] else f"DIFFERENT {alpha} {ref['vocab']}",
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--venv", type=Path, help="build (or reuse) SAEBench's venv here and keep it")
    parser.add_argument("--saebench-side", nargs=3, type=Path, metavar=("INPUTS", "OUTPUTS", "CALCULATOR_040"))
    args = parser.parse_args()
    if args.saebench_side:
        saebench_side(*args.saebench_side)
        return
    with tempfile.TemporaryDirectory(prefix="saebench_parity_") as tmp:
        folder = Path(tmp)
        venv = args.venv or folder / "venv"
        python = build_venv(venv)
        calculator = calculator_040(python, venv)
        inputs = make_inputs()
        np.savez(folder / "inputs.npz", **inputs)
        done = subprocess.run(
            [
                str(python),
                __file__,
                "--saebench-side",
                str(folder / "inputs.npz"),
                str(folder / "ref.json"),
                str(calculator),
            ],
            capture_output=True,
            text=True,
        )
        if done.returncode:
            sys.exit(f"the SAEBench side failed:\n{done.stderr[-4000:]}")
        rows = compare(inputs, json.loads((folder / "ref.json").read_text()))
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    print(f"{'saex.analysis.probing':<{widths[0]}}  {'SAEBench 0.6.0 (0.4.0 where named)':<{widths[1]}}  agreement")
    for what, reference, agreement in rows:
        print(f"{what:<{widths[0]}}  {reference:<{widths[1]}}  {agreement}")


if __name__ == "__main__":
    main()
