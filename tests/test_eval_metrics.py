"""Core reconstruction metrics, sparse probing and SCR on hand-computed and synthetic cases."""

import math

import numpy as np
import pytest
import torch

from atmpipe.eval.compute.bias import BiasConfig, scr_metrics
from atmpipe.eval.compute.core import decoder_similarity, downstream_scores, reconstruction_metrics
from atmpipe.eval.compute.probing import mean_pool, residual_baselines, sae_task_accuracies


class LinearSAE(torch.nn.Module):
    """encode = relu(x @ W_enc + b_enc) (or linear), decode = f @ W_dec + b_dec: enough to hand-build SAEs."""

    def __init__(self, W_enc, W_dec, b_enc=None, b_dec=None, relu=True):
        super().__init__()
        self.W_enc, self.W_dec, self.relu = W_enc, W_dec, relu
        self.b_enc = torch.zeros(W_enc.shape[1]) if b_enc is None else b_enc
        self.b_dec = torch.zeros(W_dec.shape[1]) if b_dec is None else b_dec

    def encode(self, x):
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        return torch.relu(pre) if self.relu else pre

    def decode(self, f):
        return f @ self.W_dec + self.b_dec


def batches(x, size=7):
    return [x[i : i + size] for i in range(0, len(x), size)]


def test_identity_sae_reconstructs_perfectly():
    torch.manual_seed(0)
    x = torch.randn(50, 6) * 3 + 1
    eye = torch.eye(6)
    out = reconstruction_metrics(LinearSAE(eye, eye, relu=False), batches(x))
    assert out["fvu"] == pytest.approx(0.0, abs=1e-12) and out["mse"] == pytest.approx(0.0, abs=1e-12)
    assert out["explained_variance"] == pytest.approx(1.0)
    assert out["cossim"] == pytest.approx(1.0) and out["l2_ratio"] == pytest.approx(1.0)
    assert out["relative_reconstruction_bias"] == pytest.approx(1.0)
    assert out["n_tokens"] == 50


def test_zero_sae_and_hand_computed_values():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    zero = LinearSAE(torch.zeros(2, 3), torch.zeros(3, 2))
    out = reconstruction_metrics(zero, batches(x, 2))
    # FVU of the zero reconstruction: Σ‖x‖² / Σ‖x − x̄‖² with x̄ = (4/3, 2).
    total_var = ((x - x.mean(0)) ** 2).sum().item()
    assert out["fvu"] == pytest.approx((1 + 4 + 25) / total_var)
    assert out["mse"] == pytest.approx(30 / 3)
    assert out["l0"] == 0 and out["frac_dead"] == 1.0 and out["cossim"] == 0.0
    # A mean-reconstructing SAE (x̂ = x̄ from b_dec) scores exactly FVU 1.
    mean_sae = LinearSAE(torch.zeros(2, 3), torch.zeros(3, 2), b_dec=x.mean(0))
    assert reconstruction_metrics(mean_sae, batches(x, 2))["fvu"] == pytest.approx(1.0)
    # Sparsity counts: latent 0 fires on rows with x0 > 0 (2 of 3), latent 1 never, latent 2 on every row.
    W_enc = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    sae = LinearSAE(W_enc, torch.eye(3, 2))
    out = reconstruction_metrics(sae, batches(x, 2))
    assert out["l0"] == pytest.approx((2 + 1 + 2) / 3)
    assert out["l1"] == pytest.approx((1 + 1 + 0 + 2 + 3 + 7) / 3)
    assert out["frac_dead"] == pytest.approx(1 / 3) and out["frac_dense"] == pytest.approx(2 / 3)
    # Scaling the reconstruction by 2: l2 ratio 2, relative reconstruction bias 2.
    double = LinearSAE(torch.eye(2), 2 * torch.eye(2), relu=False)
    out = reconstruction_metrics(double, batches(x, 2))
    assert out["l2_ratio"] == pytest.approx(2.0) and out["relative_reconstruction_bias"] == pytest.approx(2.0)


def test_decoder_similarity_and_duplicates():
    W = torch.tensor([[1.0, 0.0, 0.0], [0.99, 0.1, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    out = decoder_similarity(W, block=2)
    assert out["max_decoder_cosine"] == pytest.approx(0.99 / math.hypot(0.99, 0.1))
    assert out["frac_duplicate"] == pytest.approx(2 / 4)
    # A dead copy does not count as a duplicate of a live latent.
    out = decoder_similarity(W, live=torch.tensor([True, False, True, True]))
    assert out["frac_duplicate"] == 0.0 and out["n_live"] == 3


def test_downstream_scores_formula():
    base = {"ce_clean": 2.0, "ce_zero": 6.0, "kl_zero": 4.0, "n_predictions": 10}
    out = downstream_scores(base, {"ce_sae": 3.0, "kl_sae": 1.0})
    assert out["ce_loss_score"] == pytest.approx(0.75) and out["kl_div_score"] == pytest.approx(0.75)


def synthetic_texts(n, d, signal_dim, rng, label_fn):
    """Ragged per-token activations of n texts; a label-1 text carries +2 on `signal_dim` in every token."""
    lengths = rng.integers(3, 9, n)
    labels = np.array([label_fn(i) for i in range(n)])
    acts = []
    for length, y in zip(lengths, labels, strict=True):
        t = rng.standard_normal((length, d)) * 0.5
        t[:, signal_dim] += 2.0 * y
        acts.append(t)
    offsets = torch.zeros(n + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(torch.tensor(lengths), 0)
    return torch.tensor(np.vstack(acts), dtype=torch.float32), offsets, labels


def test_mean_pool_matches_per_text_mean():
    rng = np.random.default_rng(0)
    acts, offsets, _ = synthetic_texts(5, 4, 0, rng, lambda i: i % 2)
    pooled = mean_pool(acts, offsets, chunk=3)
    for i in range(5):
        np.testing.assert_allclose(pooled[i], acts[offsets[i] : offsets[i + 1]].mean(0).numpy(), rtol=1e-5)


def test_sparse_probing_finds_the_separating_latent():
    rng = np.random.default_rng(0)
    d = 16
    task = {}
    for split, n in (("train", 80), ("test", 40)):
        acts, offsets, labels = synthetic_texts(n, d, 5, rng, lambda i: i % 2)
        task |= {f"{split}_acts": acts, f"{split}_offsets": offsets, f"{split}_labels": labels}
    # Latent j reads dimension j; the label lives on dimension 5 only, so the top-1 latent is 5 and
    # separates the classes perfectly (pooled signal 2 ≫ pooled noise).
    sae = LinearSAE(torch.eye(d), torch.eye(d))
    acc = sae_task_accuracies(sae, task)
    assert acc["sae_top_1"] == 1.0 and acc["sae_top_5"] == 1.0
    R = {s: mean_pool(task[f"{s}_acts"], task[f"{s}_offsets"]) for s in ("train", "test")}
    base = residual_baselines(R["train"], task["train_labels"], R["test"], task["test_labels"])
    assert base["resid_top_1"] == 1.0 and base["resid_full"] == 1.0
    # An SAE that never sees dimension 5 is at chance.
    blind = torch.eye(d)
    blind[5, 5] = 0.0
    assert sae_task_accuracies(LinearSAE(blind, blind), task)["sae_top_1"] < 0.7


def test_scr_ablating_the_spurious_latent_restores_the_target():
    """Target on dims 0/3, gender on dims 1/2 (stronger); biased training data has them perfectly correlated."""
    rng = np.random.default_rng(0)
    d = 8
    target, spurious, splits = [], [], {"biased_train": [], "balanced_train": [], "test": []}
    cells = [(1, 1, 60), (0, 0, 60)]
    for split, cell_list in (
        ("biased_train", cells),
        ("balanced_train", [(t, s, 30) for t in (0, 1) for s in (0, 1)]),
        ("test", [(t, s, 30) for t in (0, 1) for s in (0, 1)]),
    ):
        for t, s, n in cell_list:
            for _ in range(n):
                splits[split].append(len(target))
                target.append(t)
                spurious.append(s)
    target, spurious = np.array(target), np.array(spurious)
    acts, lengths = [], []
    for t, s in zip(target, spurious, strict=True):
        n_tok = int(rng.integers(3, 7))
        a = rng.standard_normal((n_tok, d)) * 0.3
        a[:, 0] += 0.6 * t  # target, on two latents like the gender: the probe's bias stays centred
        a[:, 3] += 0.6 * (1 - t)
        a[:, 1] += 3.0 * s  # "male" latent
        a[:, 2] += 3.0 * (1 - s)  # "female" latent
        acts.append(a)
        lengths.append(n_tok)
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(torch.tensor(lengths), 0)
    data = {
        "acts": torch.tensor(np.vstack(acts), dtype=torch.float32),
        "offsets": offsets,
        "target": target,
        "spurious": spurious,
        **{k: np.array(v) for k, v in splits.items()},
    }
    sae = LinearSAE(torch.eye(d), torch.eye(d))
    out = scr_metrics(sae, data, BiasConfig(n_values=(2, 3)))
    assert out["status"] == "ok"
    assert out["a_oracle"] > 0.9 and out["a_base"] < 0.8
    # The top-2 latents by effect on the gender probe are the gender latents; removing them leaves the
    # biased probe reading the target only.
    assert out["ablated_accuracy"]["2"] > out["a_base"] + 0.15
    assert sorted(out["top_latents"][:2]) == [1, 2]
    assert out["scr"]["2"] > 0.3
