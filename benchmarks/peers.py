"""Benchmark worker: one SAE training configuration in its own process, timed step by step.

Runs the peers (SAELens, sparsify) through their own training-step code in the peers venv
(`.venv-peers/bin/python benchmarks/peers.py --impl saelens --method topk ...`). It never imports
atmpipe; `bench_train.py` reuses `serve` for atmpipe's own worker in `.venv`.

Protocol: the parent writes one JSON command per line on stdin, the worker answers one JSON line:
    {"cmd": "steps", "n": N}  ->  {"times": [seconds per step, ...]}
    {"cmd": "rss"}            ->  {"peak_rss_mb": ..., "baseline_rss_mb": ...}
    {"cmd": "quit"}
A step is exactly what the trainer does per batch: forward, backward, optimiser step and the method's
bookkeeping. The baseline RSS is the peak after imports and data loading, before the SAE exists, so
peak - baseline is the memory the training itself needs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

K = 32  # TopK's k, the same for every implementation
MATRYOSHKA_K = 64  # Matryoshka's (BatchTopK) k: bench_train.L0
# Its nesting as fractions of d_sae: atmpipe's default (atmpipe.sae.matryoshka.DEFAULT_PREFIXES; this
# module runs in the peers venv and never imports atmpipe).
MATRYOSHKA_PREFIXES = [1 / 256, 1 / 64, 1 / 16, 1 / 4, 1.0]


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def load_batches(path: str, batch: int) -> list[torch.Tensor]:
    """The shared synthetic activations (a .npy written by run_all.py), cut into batches."""
    acts = torch.from_numpy(np.load(path, allow_pickle=False))
    return list(acts.split(batch))[: len(acts) // batch]


# BENCH_PRECISION=bf16 (bench_train.PRECISION): each peer's own bf16 option, where it has one.
BF16 = os.environ.get("BENCH_PRECISION", "fp32") == "bf16"


def claim_stdout():
    """The protocol's own stdout; libraries that print (sparsify does on import) now print to stderr."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return proto


def serve(
    make_step: Callable[[torch.device], Callable[[torch.Tensor], None]], data: str, batch: int, proto
) -> None:
    """Answer the parent's commands on `proto` (from claim_stdout)."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    device = torch.device(os.environ.get("BENCH_DEVICE", "cpu"))
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    batches = [b.to(device) for b in load_batches(data, batch)]
    baseline = rss_mb()
    torch.manual_seed(0)
    step = make_step(device)
    n_done = 0
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "steps":
            times = []
            for _ in range(cmd["n"]):
                x = batches[n_done % len(batches)]
                sync()
                t0 = time.perf_counter()
                step(x)
                sync()
                times.append(time.perf_counter() - t0)
                n_done += 1
            answer = {"times": times}
        elif cmd["cmd"] == "rss":
            answer = {"peak_rss_mb": rss_mb(), "baseline_rss_mb": baseline}
            if device.type == "cuda":
                answer["peak_device_mb"] = torch.cuda.max_memory_allocated() / 2**20
        else:
            break
        proto.write(json.dumps(answer) + "\n")


# --- SAELens: its SAETrainer.step (training_forward_pass, dead-latent stats, backward, clip, Adam, schedulers)


def saelens_step(method: str, d_in: int, d_sae: int, device: torch.device) -> Callable[[torch.Tensor], None]:
    from sae_lens import (
        JumpReLUTrainingSAE,
        JumpReLUTrainingSAEConfig,
        MatryoshkaBatchTopKTrainingSAE,
        MatryoshkaBatchTopKTrainingSAEConfig,
        StandardTrainingSAE,
        StandardTrainingSAEConfig,
        TopKTrainingSAE,
        TopKTrainingSAEConfig,
    )
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    common = dict(d_in=d_in, d_sae=d_sae, dtype="float32", device=str(device))
    if method == "topk":
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(k=K, **common))
    elif method == "jumprelu":
        sae = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(l0_coefficient=1.0, **common))
    elif method == "matryoshka":
        widths = [round(f * d_sae) for f in MATRYOSHKA_PREFIXES]
        cfg = MatryoshkaBatchTopKTrainingSAEConfig(k=MATRYOSHKA_K, matryoshka_widths=widths, **common)
        sae = MatryoshkaBatchTopKTrainingSAE(cfg)
    elif method == "relu":
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(l1_coefficient=1.0, **common))
    else:
        raise ValueError(f"SAELens has no {method!r} SAE")
    trainer = SAETrainer(
        cfg=SAETrainerConfig(
            total_training_samples=10**12,
            train_batch_size_samples=4096,
            lr=3e-4,
            lr_end=3e-4,
            autocast=BF16,  # SAELens's own option: its step under torch.autocast(bf16) on any device
        ),
        sae=sae,
        data_provider=iter(()),
    )

    def step(x: torch.Tensor) -> None:
        # What SAETrainer.fit does per batch, minus wandb and the progress bar.
        trainer.maybe_reset_sparsity()
        trainer.step(x)
        trainer.n_training_steps += 1

    return step


# --- sparsify: the per-batch body of sparsify.Trainer.fit for loss_fn="fvu" (its hook + optimiser block).
# Its Trainer needs a language model to hook, so the same calls are made here on the activation batch.


# sparsify has no precision option: its forward autocasts to bf16 on CUDA only (where the GPU supports it),
# so on the CPU its step stays fp32 whatever BENCH_PRECISION says.
def sparsify_step(method: str, d_in: int, d_sae: int, device: torch.device) -> Callable[[torch.Tensor], None]:
    if method != "topk":
        raise ValueError(f"sparsify has no {method!r} SAE")
    from sparsify import SparseCoder, SparseCoderConfig
    from transformers import get_linear_schedule_with_warmup

    sae = SparseCoder(d_in, SparseCoderConfig(num_latents=d_sae, k=K), device, dtype=torch.float32)
    # Adam, as atmpipe and SAELens use (sparsify's default is schedule-free signSGD).
    opt = torch.optim.Adam(sae.parameters(), lr=2e-4 / (d_sae / 2**14) ** 0.5)
    sched = get_linear_schedule_with_warmup(opt, 1000, 10**9)
    tokens_since_fired = torch.zeros(d_sae, dtype=torch.long, device=device)
    did_fire = torch.zeros(d_sae, dtype=torch.bool, device=device)

    def step(x: torch.Tensor) -> None:
        sae.set_decoder_norm_to_unit_norm()
        total_variance = (x - x.mean(0)).pow(2).sum()
        out = sae(x=x, y=x, dead_mask=None, total_variance=total_variance)  # auxk_alpha defaults to 0
        did_fire[out.latent_indices.flatten()] = True
        float(out.fvu.detach())  # its running FVU average
        loss = out.fvu + 0.0 * out.auxk_loss + out.multi_topk_fvu / 8
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        sched.step()
        with torch.no_grad():
            tokens_since_fired.add_(x.shape[0])
            tokens_since_fired[did_fire] = 0
            did_fire.zero_()

    return step


PEERS = {"saelens": saelens_step, "sparsify": sparsify_step}
LIBRARIES = {"saelens": "sae_lens", "sparsify": "sparsify"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--impl", choices=sorted(PEERS), required=True)
    p.add_argument("--method", required=True)
    p.add_argument("--d-in", type=int, required=True)
    p.add_argument("--d-sae", type=int, required=True)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--data", required=True)
    a = p.parse_args()
    proto = claim_stdout()
    importlib.import_module(
        LIBRARIES[a.impl]
    )  # before the baseline RSS: library imports are not training memory
    serve(lambda device: PEERS[a.impl](a.method, a.d_in, a.d_sae, device), a.data, a.batch, proto)


if __name__ == "__main__":
    main()
