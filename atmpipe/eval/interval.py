"""95% intervals for accuracies measured on a finite test set with a few probe seeds.

A score here is a mean over test examples of a per-example value (1/0 for correct/wrong, or a paired
difference of two such), measured once per probe seed. Its interval carries two sources of noise:
- test sampling: a bootstrap over the test examples (the same resampled examples for every seed);
- probe seeds: the spread of the score over seeds, as the standard error of their mean (sd / sqrt(S)).
They are added in quadrature and the interval is the normal one, point ± 1.96 · se. The tasks themselves
are fixed: a mean over tasks carries no task-sampling noise.
"""

from __future__ import annotations

import numpy as np

Z95 = 1.959963984540054
N_BOOT = 1000


def bootstrap_weights(n: int, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """[n_boot, n] resampling counts: row b says how often each of the n examples is drawn in replicate b."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)


def replicates(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """[n_boot] bootstrap replicates of the seed-averaged mean of `values` [S, n] under `weights` [n_boot, n]."""
    return weights @ np.asarray(values, dtype=np.float64).mean(0) / weights.sum(1)


def summarise(point: float, boot: np.ndarray, per_seed: np.ndarray) -> dict:
    """The interval of `point` from its bootstrap replicates and its per-seed values, and what it carries."""
    se_test = float(np.std(boot, ddof=1))
    sd_seed = float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else 0.0
    se = float(np.hypot(se_test, sd_seed / np.sqrt(len(per_seed))))
    return {
        "mean": float(point),
        "lo": float(point - Z95 * se),
        "hi": float(point + Z95 * se),
        "half_width": float(Z95 * se),
        "se_test_bootstrap": se_test,
        "sd_over_seeds": sd_seed,
        "n_seeds": len(per_seed),
    }


def task_interval(values: np.ndarray, n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """One task's score (mean of `values` [S, n] over seeds and examples) with its 95% interval."""
    values = np.asarray(values, dtype=np.float64)
    boot = replicates(values, bootstrap_weights(values.shape[1], n_boot, seed))
    return summarise(values.mean(), boot, values.mean(1)) | {"n_test": int(values.shape[1])}


def mean_interval(per_task: list[np.ndarray], seeds: list[int] | None = None, n_boot: int = N_BOOT) -> dict:
    """The unweighted mean over tasks of their scores ([S, n_t] each), each task resampled on its own with
    its bootstrap seed (`seeds[i]`, default i): give a task the seed of its own interval to pair them."""
    seeds = list(range(len(per_task))) if seeds is None else seeds
    values = [np.asarray(v, dtype=np.float64) for v in per_task]
    boots = [
        replicates(v, bootstrap_weights(v.shape[1], n_boot, s)) for v, s in zip(values, seeds, strict=True)
    ]
    per_seed = np.mean([v.mean(1) for v in values], axis=0)
    point = float(np.mean([v.mean() for v in values]))
    return summarise(point, np.mean(boots, axis=0), per_seed) | {"n_tasks": len(values)}
