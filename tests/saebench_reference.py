"""SAEBench's own absorption functions on fixed inputs, for tests/test_absorption_saebench.py.

Run with .venv-saebench's python (SAEBench pins numpy < 2, so it lives in its own venv):
    python tests/saebench_reference.py IN.npz OUT.npz
IN holds the activations (x_train, y_train, x_test, y_test, x_score), a ReLU SAE (W_enc, b_enc, W_dec,
b_dec) or a saved SAE directory (sae_dir, loaded with SAELens), the seed and the letter to score. The probes are trained in SAEBench's pipeline batch sizes
(`train_and_save_probes`' default for the ground-truth probe, the eval config's for the L1 probe). OUT holds SAEBench's ground-truth probe,
its L1 ranking probe, its main latents and F1s per letter, and its per-word absorption for that letter.
"""

import inspect
import sys
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch
from sae_bench.evals.absorption import common
from sae_bench.evals.absorption import k_sparse_probing as ks
from sae_bench.evals.absorption.eval_config import AbsorptionEvalConfig
from sae_bench.evals.absorption.feature_absorption_calculator import FeatureAbsorptionCalculator
from sae_bench.evals.absorption.probing import train_linear_probe_for_task
from sae_bench.evals.absorption.vocab import LETTERS
from sae_lens import SAE


class ReluSAE(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.W_enc = torch.nn.Parameter(torch.as_tensor(d["W_enc"]))
        self.b_enc = torch.nn.Parameter(torch.as_tensor(d["b_enc"]))
        self.W_dec = torch.nn.Parameter(torch.as_tensor(d["W_dec"]))
        self.b_dec = torch.nn.Parameter(torch.as_tensor(d["b_dec"]))
        self.cfg = SimpleNamespace(d_sae=self.W_enc.shape[1])
        self.device, self.dtype = torch.device("cpu"), torch.float32

    def encode(self, x):
        return torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)


class FixedActivations:
    """Stands in for the LM: the residual of a prompt is the fixed row of the word its last line asks about."""

    def __init__(self, rows: dict[str, np.ndarray], hook: str):
        self.rows, self.hook = rows, hook
        self.tokenizer = object()

    def to_tokens(self, text):
        return torch.zeros(1, 7)

    def run_with_cache(self, prompts, names_filter):
        words = [p.rsplit("\n", 1)[-1].removesuffix(" has the first letter:") for p in prompts]
        acts = torch.stack([torch.as_tensor(self.rows[w]) for w in words])[:, None, :].repeat(1, 7, 1)
        return None, {self.hook: acts}


def main(src: str, dst: str) -> None:
    d = dict(np.load(src))
    seed, letter = int(d["seed"]), int(d["letter"])
    gt_batch = inspect.signature(common.train_and_save_probes).parameters["batch_size"].default
    sparse_batch = AbsorptionEvalConfig().k_sparse_probe_batch_size
    words_train = [f"w{i}" for i in range(len(d["y_train"]))]
    words_test = [f"t{i}" for i in range(len(d["y_test"]))]
    torch.manual_seed(seed)
    probe, _ = train_linear_probe_for_task(
        pd.DataFrame({"answer_class": d["y_train"]}),
        pd.DataFrame({"answer_class": d["y_test"]}),
        torch.device("cpu"),
        d["x_train"],
        d["x_test"],
        batch_size=gt_batch,
    )
    # A saved SAE directory (an atmpipe Matryoshka) is read as SAEBench reads any SAELens SAE.
    sae = SAE.load_from_disk(str(d["sae_dir"]), device="cpu") if str(d["sae_dir"]) else ReluSAE(d)
    torch.manual_seed(seed)
    k_probes = ks.train_k_sparse_probes(
        sae,
        list(zip(words_train, d["y_train"].tolist(), strict=True)),
        torch.as_tensor(d["x_train"]),
        ks=list(range(1, 11)),
        batch_size=sparse_batch,
    )
    raw = ks.eval_probe_and_sae_k_sparse_raw_scores(
        sae,
        probe,
        k_probes,
        list(zip(words_test, d["y_test"].tolist(), strict=True)),
        torch.as_tensor(d["x_test"]),
    )
    metrics = ks.build_metrics_df(
        raw, ks.sae_k_sparse_metadata(sae, probe, k_probes, "sae", 0), max_k_value=10
    )
    ks.add_feature_splits_to_metrics_df(metrics, max_k_value=10, f1_jump_threshold=0.03)
    split = {r["letter"]: list(r["split_feats"]) for _, r in metrics.iterrows()}
    f1_k = np.array([[metrics.iloc[c][f"f1_sparse_sae_{k}"] for k in range(1, 11)] for c in range(26)])

    # Per-word absorption of `letter` on its probe true positives, re-prompted (fixed rows here).
    c = LETTERS[letter]
    true_pos = raw[(raw["answer_letter"] == c) & (raw[f"score_probe_{c}"] > 0)]["token"].tolist()
    rows = {w: d["x_score"][int(w[1:])] for w in true_pos}
    calc = FeatureAbsorptionCalculator(
        model=FixedActivations(rows, "blocks.0.hook_resid_post"),
        icl_word_list=words_test,
        max_icl_examples=10,
        base_template="{word} has the first letter:",
        word_token_pos=-6,
    )
    res = calc.calculate_absorption(sae, true_pos, probe.weights[letter].detach(), split[c], layer=0)
    np.savez(
        dst,
        batches=np.array([gt_batch, sparse_batch]),
        gt_weights=probe.weights.detach().numpy(),
        gt_bias=probe.biases.detach().numpy(),
        f1_probe=metrics["f1_probe"].to_numpy(),
        f1_sparse=f1_k,
        split_feats=np.array([split[c] + [-1] * (10 - len(split[c])) for c in LETTERS]),
        true_pos=np.array([int(w[1:]) for w in true_pos]),
        fractions=np.array([r.absorption_fraction for r in res.word_results], dtype=float),
        fulls=np.array([r.is_full_absorption for r in res.word_results], dtype=bool),
    )


if __name__ == "__main__":
    main(*sys.argv[1:3])
