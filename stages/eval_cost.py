"""What probing, SCR and TPP cost per SAE at the reproduction's width once the LM activations are cached: the
input of stages/reproduce-budget.json's eval_s.per_sae_labelled (stages/reproduce.sh evaluates every SAE
with them).

    .venv/bin/python stages/eval_cost.py --store cache/demo-l9.zarr [--tokens 65536] [--methods topk,relu,matryoshka]

Per SAE the eval encodes every cached probing and TPP token and mean-pools the latents over each text
(`probing.mean_pool` with the SAE's encoder), then fits its probes: per task 3 probe seeds × 5 values of k.
This times both on real residuals of a store, with a freshly initialised SAE of the reproduction's width (8 ×
d_model; the encoder's cost does not depend on its training), and scales them to the reproduction's sizes:
TOKENS (4.41M probing + 0.32M TPP tokens at the eval defaults, benchmarks/probing_tokens.py) and 51 tasks.
SCR (one token per person) and TPP's re-measured probes are left out: they took 4 s and 9-14 s per demo SAE.
On shared cores the wall times stretch with the load, so it also prints the CPU seconds the process got:
on 2 idle cores the wall time would lie between CPU / 2 (both threads busy throughout) and CPU (one).
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import numpy as np
import torch

from atmpipe.eval.compute import probing
from atmpipe.sae import SAEConfig, make_sae
from atmpipe.store import open_store

TOKENS = 4_410_000 + 320_000  # probing + TPP tokens per SAE at the eval defaults
TASKS = 51
TEXT_TOKENS = 86  # mean tokens a probing text keeps (4.41M tokens over 51 tasks × up to 2000 texts)
HPARAMS = {
    "topk": {"k": 64},
    "matryoshka": {"k": 64},
    "relu": {"target_l0": 64.0},
    "atm": {"target_l0": 64.0},
}


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(fn, *args) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of fn(*args)."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    fn(*args)
    return time.perf_counter() - wall, cpu_seconds() - cpu


def pooling_seconds(sae, acts: torch.Tensor) -> tuple[float, float]:
    """Wall and CPU seconds to encode and mean-pool `acts` as ~TEXT_TOKENS-token texts, from float16 as the
    cache holds them (the eval's per-SAE work per token)."""
    n_texts = len(acts) // TEXT_TOKENS
    offsets = torch.arange(n_texts + 1) * TEXT_TOKENS
    return timed(probing.mean_pool, acts[: n_texts * TEXT_TOKENS].half(), offsets, sae.encode)


def fit_seconds(sae, acts: torch.Tensor, n_texts: int = 2000) -> tuple[float, float]:
    """Wall and CPU seconds for one task's probes (3 seeds × k 1, 2, 5, 10, 20) on 1000 train / 1000 test pooled texts,
    labelled by a direction of the residual (a task the latents can learn)."""
    rng = np.random.default_rng(0)
    offsets = torch.arange(n_texts + 1) * (len(acts) // n_texts)
    acts = acts[: offsets[-1]]
    F = probing.mean_pool(acts, offsets, sae.encode)
    R = probing.mean_pool(acts, offsets)
    score = R @ rng.standard_normal(R.shape[1])
    y = (score > np.median(score)).astype(int)
    return timed(probing.sparse_probe_correct, F[::2], y[::2], F[1::2], y[1::2])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--methods", default="topk,relu,matryoshka")
    args = ap.parse_args()
    store = open_store(args.store)
    layer = store.layers[0]
    acts = torch.from_numpy(np.asarray(store.read_acts("train", layer, 0, args.tokens), dtype=np.float32))
    d_in = acts.shape[1]
    print(f"{len(acts)} tokens of {args.store} (d_model {d_in}); {torch.get_num_threads()} threads; load average {os.getloadavg()}")  # fmt: skip
    for method in args.methods.split(","):
        sae = make_sae(SAEConfig(method, d_in, 8 * d_in, HPARAMS[method])).eval().requires_grad_(False)
        with torch.no_grad():
            pool, pool_cpu = pooling_seconds(sae, acts)
            fit, fit_cpu = fit_seconds(sae, acts)
        scale = TOKENS / len(acts)
        per_sae, per_cpu = pool * scale + fit * TASKS, pool_cpu * scale + fit_cpu * TASKS
        print(
            f"{method} d_sae {8 * d_in}: encode + pool {pool:.2f} s wall, {pool_cpu:.2f} s CPU for {len(acts)} "
            f"tokens; one task's probes {fit:.2f} s wall; per SAE at the reproduction's sizes {per_sae:.0f} s wall "
            f"here, {per_cpu:.0f} s CPU: on 2 idle cores {per_cpu / 2:.0f}-{per_cpu:.0f} s"
        )


if __name__ == "__main__":
    main()
