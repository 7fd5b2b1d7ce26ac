"""Targeted probe perturbation (SAEBench TPP) on the multi-class sets that ship.

Per set and class c: a one-vs-rest probe on the mean-pooled residual (class c against as many texts of
the other classes). Per SAE and class c: rank latents by max(0, Δmean pooled latent between c and the rest)
× ⟨decoder row, probe c⟩, zero-ablate the top N keeping the SAE's error term (on the pooled residual that is
subtracting their pooled decoded contribution, exactly), and re-measure every probe:
TPP(N) = mean_c [ (A_c − A_c^{abl c}) − mean_{j≠c} (A_j − A_j^{abl c}) ].
A good SAE removes class c from its own probe and leaves the others alone.
"""

from __future__ import annotations

import numpy as np
import torch

from atmpipe.eval.compute.bias import ResidualProbe


def one_vs_rest(labels: np.ndarray, c: int, seed: int) -> np.ndarray:
    """Indices of class c and as many others drawn at random (sorted): probe c's balanced examples."""
    rng = np.random.default_rng(seed + 1000 * c)
    pos, neg = np.flatnonzero(labels == c), np.flatnonzero(labels != c)
    return np.sort(np.concatenate([pos, rng.choice(neg, min(len(pos), len(neg)), replace=False)]))


def class_probes(R_train, y_train, R_test, y_test, n_classes: int, seed: int = 0) -> list[dict]:
    """Per class: its probe, its test examples and their clean 0/1 correctness (SAE-independent)."""
    probes = []
    for c in range(n_classes):
        tr, te = one_vs_rest(y_train, c, seed), one_vs_rest(y_test, c, seed)
        probe = ResidualProbe(R_train[tr], (y_train[tr] == c).astype(int), seed)
        probes.append(
            {
                "probe": probe,
                "train": tr,
                "test": te,
                "clean": probe.correct(R_test[te], (y_test[te] == c).astype(int)),
            }
        )
    return probes


@torch.no_grad()
def tpp_correct(sae, F_train, F_test, R_test, y_train, y_test, probes, n_values) -> dict:
    """correct[N][c][j]: probe j's 0/1 correctness on its test examples after ablating class c's top N."""
    W_dec = sae.W_dec.detach().float().cpu().numpy()
    out = {str(n): [] for n in n_values}
    for c, pc in enumerate(probes):
        pos = y_train[pc["train"]] == c
        diff = F_train[pc["train"]][pos].mean(0) - F_train[pc["train"]][~pos].mean(0)
        effects = np.clip(diff, 0, None) * (W_dec @ pc["probe"].weight)
        ranked = np.argsort(-effects, kind="stable")
        for n in n_values:
            chosen = ranked[: min(n, int((effects > 0).sum()))]
            R_abl = R_test - F_test[:, chosen] @ W_dec[chosen]
            out[str(n)].append(
                [
                    pj["probe"].correct(R_abl[pj["test"]], (y_test[pj["test"]] == j).astype(int))
                    for j, pj in enumerate(probes)
                ]
            )
    return out


def tpp_replicates(probes, correct: dict, n_test: int, weights: np.ndarray) -> dict[str, np.ndarray]:
    """TPP(N) of one set under each bootstrap replicate of its test texts (row of `weights`, [B, n_test])."""

    def acc(j: int, v: np.ndarray) -> np.ndarray:
        w = weights[:, probes[j]["test"]]
        return w @ v / w.sum(1)

    clean = [acc(j, p["clean"]) for j, p in enumerate(probes)]
    out = {}
    for n, per_c in correct.items():
        scores = []
        for c, row in enumerate(per_c):
            drops = [clean[j] - acc(j, row[j]) for j in range(len(probes))]
            scores.append(drops[c] - np.mean([d for j, d in enumerate(drops) if j != c], axis=0))
        out[n] = np.mean(scores, axis=0)
    return out
