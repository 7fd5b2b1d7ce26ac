"""Sparse probing (SAEBench `evals/sparse_probing`): mean-pooled SAE latents, top-k by mean difference.

The LM half (`text_activations`) turns texts into ragged per-token residuals (pad and BOS removed), cached
per model/layer by the caller; the metric half is pure: pooled features in, per-example test correctness out (intervals: `interval`).
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from atmpipe.lm import capture

K_VALUES = (1, 2, 5, 10, 20)  # SAEBench reports 1, 2, 5, 10, 20 (and 50)
SEEDS = (0, 1, 2)  # probe seeds: each resamples the training set


@torch.no_grad()
def text_activations(
    lm, layer: int, texts: list[str], context: int, batch_size: int = 8, progress=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer-`layer` residual of every non-pad, non-BOS token: (acts [n_tokens, d], offsets [n_texts + 1])."""
    tok = lm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    special = {t for t in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) if t is not None}
    acts, lengths = [], []
    order = np.argsort([len(t) for t in texts])  # similar lengths per batch: less padding
    encoded = [tok(texts[i], truncation=True, max_length=context)["input_ids"] for i in order]
    per_text: list[torch.Tensor | None] = [None] * len(texts)
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start : start + batch_size]
        width = max(len(ids) for ids in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, row in enumerate(batch):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        resid = (
            capture(lm, ids.to(lm.device), [layer], attention_mask=mask.to(lm.device))[layer].float().cpu()
        )
        for i, row in enumerate(batch):
            keep = torch.tensor([t not in special for t in row], dtype=torch.bool)
            per_text[order[start + i]] = resid[i, : len(row)][keep]
        if progress is not None:
            progress(len(batch))
    for t in per_text:
        acts.append(t)
        lengths.append(t.shape[0])
    offsets = torch.zeros(len(texts) + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(torch.tensor(lengths), 0)
    return torch.cat(acts), offsets


@torch.no_grad()
def mean_pool(acts: torch.Tensor, offsets: torch.Tensor, fn=None, chunk: int = 4096) -> np.ndarray:
    """Mean over each text's tokens of fn(token activations) (identity: the pooled residual).

    A chunk's tokens belong to a contiguous run of texts, so each chunk is summed per text in float32 over
    that run alone and only those few rows are added into the float64 totals: converting every token's
    latents to float64 first cost as much as the SAE's encoder."""
    n_texts = len(offsets) - 1
    owner = torch.repeat_interleave(torch.arange(n_texts), offsets[1:] - offsets[:-1])
    sums = None
    for start in range(0, acts.shape[0], chunk):
        x = acts[start : start + chunk].float()
        y = fn(x) if fn is not None else x
        if sums is None:
            sums = torch.zeros(n_texts, y.shape[1], dtype=torch.float64)
        own = owner[start : start + chunk]
        first, last = int(own[0]), int(own[-1])
        part = torch.zeros(last - first + 1, y.shape[1], dtype=y.dtype)
        part.index_add_(0, own - first, y)
        sums[first : last + 1] += part
    counts = (offsets[1:] - offsets[:-1]).clamp(min=1).double()[:, None]
    return (sums / counts).float().numpy()


def top_k_by_mean_diff(X: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """The k columns with the largest |mean over positives − mean over negatives| (ties: lower index first)."""
    diff = np.abs(X[y == 1].mean(0) - X[y == 0].mean(0))
    return np.argsort(-diff, kind="stable")[:k]


def fit_probe(X_train, y_train, seed: int = 0):
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    return clf.fit(X_train, y_train)


def probe_accuracy(X_train, y_train, X_test, y_test, seed: int = 0) -> float:
    return float((fit_probe(X_train, y_train, seed).predict(X_test) == y_test).mean())


def train_resample(y: np.ndarray, seed: int) -> np.ndarray:
    """Probe seed `seed`'s training examples: a bootstrap resample drawn within each class (both stay present)."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.choice(np.flatnonzero(y == c), (y == c).sum()) for c in (0, 1)])


def sparse_probe_correct(X_train, y_train, X_test, y_test, ks=K_VALUES, seeds=SEEDS) -> dict[int, np.ndarray]:
    """For each k, [n_seeds, n_test] 0/1 correctness of a logistic regression on the top-k columns.

    Each probe seed resamples the training set (`train_resample`); the top-k selection by mean difference
    and the fit both see only that resample. k = 0 stands for every column (the full probe).
    """
    out = {k: np.zeros((len(seeds), len(y_test)), dtype=np.int8) for k in ks}
    for i, seed in enumerate(seeds):
        idx = train_resample(y_train, seed)
        Xs, ys = X_train[idx], y_train[idx]
        for k in ks:
            feats = top_k_by_mean_diff(Xs, ys, k) if k else np.arange(X_train.shape[1])
            pred = fit_probe(Xs[:, feats], ys, seed).predict(X_test[:, feats])
            out[k][i] = pred == y_test
    return out


def sparse_probe_accuracies(X_train, y_train, X_test, y_test, ks=K_VALUES, seed: int = 0) -> dict[int, float]:
    """Test accuracy of a logistic regression on the top-k features by |mean_pos − mean_neg|, for each k."""
    out = {}
    for k in ks:
        feats = top_k_by_mean_diff(X_train, y_train, k)
        out[k] = probe_accuracy(X_train[:, feats], y_train, X_test[:, feats], y_test, seed)
    return out


def residual_correct(R_train, y_train, R_test, y_test, ks=K_VALUES, seeds=SEEDS) -> dict[str, np.ndarray]:
    """SAE-independent baselines' correctness: the top-k raw residual dimensions and the full residual."""
    got = sparse_probe_correct(R_train, y_train, R_test, y_test, (*ks, 0), seeds)
    return {f"resid_top_{k}": got[k] for k in ks} | {"resid_full": got[0]}


def residual_baselines(R_train, y_train, R_test, y_test, ks=K_VALUES, seed: int = 0) -> dict:
    """SAE-independent baselines: top-k raw residual dimensions and the full residual."""
    tops = sparse_probe_accuracies(R_train, y_train, R_test, y_test, ks, seed)
    return {f"resid_top_{k}": v for k, v in tops.items()} | {
        "resid_full": probe_accuracy(R_train, y_train, R_test, y_test, seed)
    }


def sae_pooled(sae, task: dict) -> dict[str, np.ndarray]:
    """The SAE's latents mean-pooled over each text's tokens, for the train and test texts of `task`."""
    return {s: mean_pool(task[f"{s}_acts"], task[f"{s}_offsets"], sae.encode) for s in ("train", "test")}


def sae_task_correct(sae, task: dict, ks=K_VALUES, seeds=SEEDS) -> dict[str, np.ndarray]:
    """One task's per-seed, per-example correctness of the top-k probes on the SAE's mean-pooled latents."""
    F = sae_pooled(sae, task)
    got = sparse_probe_correct(F["train"], task["train_labels"], F["test"], task["test_labels"], ks, seeds)
    return {f"sae_top_{k}": v for k, v in got.items()}


def sae_task_accuracies(sae, task: dict, ks=K_VALUES, seed: int = 0) -> dict:
    """One task's top-k accuracies on the SAE's mean-pooled latents (one probe on the whole training set).

    `task` holds train/test `acts` + `offsets` (ragged per-token residuals) and 0/1 `labels`.
    """
    F = sae_pooled(sae, task)
    tops = sparse_probe_accuracies(F["train"], task["train_labels"], F["test"], task["test_labels"], ks, seed)
    return {f"sae_top_{k}": v for k, v in tops.items()}
