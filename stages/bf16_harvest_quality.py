"""The harvest in bf16 against fp32: the relative error of bf16-computed residual activations on the same
tokens, per token (mean and max), beside the spread between two fp32 runs on 1 and 2 threads.

    bf16_harvest_quality.py STORE OUT_JSON [--windows 8] [--model gemma-3-270m]

The tokens are the store's first training windows (its model and layer); each forward is atmpipe's own
(`lm.capture`, as `atmpipe harvest` runs it). On a CPU without bf16 units the bf16 forward is native but
slow (tens of times fp32's): keep --windows small.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from atmpipe.lm import capture, load_lm
from atmpipe.store import open_store


def activations(lm, ids: torch.Tensor, layer: int, threads: int) -> tuple[torch.Tensor, float]:
    torch.set_num_threads(threads)
    start = time.perf_counter()
    with torch.no_grad():
        x = capture(lm, ids, [layer])[layer].reshape(-1, lm.d_model).float()
    return x, time.perf_counter() - start


def per_token_error(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return (x - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-30)


def summary(err: torch.Tensor, keep: torch.Tensor) -> dict:
    e = err[keep]
    return {
        "mean": float(e.mean()),
        "median": float(e.median()),
        "max": float(e.max()),
        "n_tokens": int(keep.sum()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store")
    ap.add_argument("out")
    ap.add_argument("--windows", type=int, default=8)
    args = ap.parse_args()
    store = open_store(args.store)
    layer, ctx = store.layers[0], store.attrs["context_size"]
    tokens = np.asarray(store.split("train").tokens[: args.windows * ctx], dtype=np.int64)
    ids = torch.from_numpy(tokens).view(args.windows, ctx)
    model = store.attrs["model"]["name"]
    runs = {}
    lm = load_lm(model, device="cpu", dtype="float32")
    ref, runs["fp32, 2 threads"] = activations(lm, ids, layer, 2)
    fp32_1, runs["fp32, 1 thread"] = activations(lm, ids, layer, 1)
    lm = load_lm(model, device="cpu", dtype="bfloat16")
    bf16, runs["bf16, 2 threads"] = activations(lm, ids, layer, 2)
    not_bos = torch.arange(len(tokens)) % ctx != 0  # position 0 (BOS, an outlier in norm) reported apart
    every = torch.ones_like(not_bos)
    result = {
        "store": str(args.store),
        "model": model,
        "layer": layer,
        "tokens": len(tokens),
        "bf16_vs_fp32": {"all": summary(per_token_error(bf16, ref), every),
                         "without_bos": summary(per_token_error(bf16, ref), not_bos)},
        "fp32_1_vs_2_threads": {"all": summary(per_token_error(fp32_1, ref), every),
                                "without_bos": summary(per_token_error(fp32_1, ref), not_bos)},
        "seconds": runs,
        "cpu": platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
    }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
