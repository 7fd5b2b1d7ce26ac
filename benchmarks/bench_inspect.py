"""`atmpipe inspect` at the reproduction's size: build time, and page load times in headless Chromium.

Targets (issue 16): the browser builds in ≤ 120 s for 5,120 latents × 65,536 held-out tokens on 2 cores;
the index opens in ≤ 2 s, a latent's page in ≤ 0.5 s. The store is synthetic (gemma-3-270m's d_model 640,
Zipf-distributed token ids over its vocabulary, 128-token windows), the SAE a ReLU SAE whose biases make
it fire at L0 ≈ 64; the unembedding is the real embedded model's (262,144 tokens × 640), the largest cost.

    .venv/bin/python benchmarks/bench_inspect.py [--latents 5120] [--tokens 65536] [--saes 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from atmpipe.inspect.config import InspectConfig  # noqa: E402
from atmpipe.inspect.run import build  # noqa: E402
from atmpipe.sae import SAEConfig, make_sae  # noqa: E402
from atmpipe.store import write_arrays_store  # noqa: E402

D_MODEL, VOCAB, LAYER, CTX, L0 = 640, 262144, 9, 128, 64


def synthetic_store(path: Path, n_eval: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    splits = {}
    for name, n in (("train", 4096), ("eval", n_eval)):
        tokens = np.minimum(rng.zipf(1.3, n), VOCAB - 1).astype(np.int64)
        positions = np.arange(n) % CTX
        tokens[positions == 0] = 2
        acts = rng.normal(size=(n, D_MODEL)).astype(np.float32) * 4
        splits[name] = {"acts": acts, "tokens": tokens, "positions": positions, "bos": positions == 0}
    return write_arrays_store(path, splits, layer=LAYER, chunk_tokens=4096, shard_tokens=16384)


def sparse_sae(path: Path, d_sae: int, sample: np.ndarray, seed: int) -> Path:
    """A ReLU SAE whose per-latent bias puts each latent's firing rate at L0 / d_sae."""
    torch.manual_seed(seed)
    sae = make_sae(SAEConfig("relu", D_MODEL, d_sae, model_name="gemma-3-270m", layer=LAYER))
    with torch.no_grad():
        pre = torch.from_numpy(sample) @ sae.W_enc
        sae.b_enc.copy_(-torch.quantile(pre, 1 - L0 / d_sae, dim=0))
    sae.save(path)
    return path


def page_times(index: Path, latent: int) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from test_inspect import chromium, wait_for

    driver = chromium()
    try:
        times = {}
        t = time.perf_counter()
        driver.get(index.as_uri())
        wait_for(driver, "#index tr.latent-row", 30)
        times["index_s"] = time.perf_counter() - t
        t = time.perf_counter()
        driver.execute_script(f"location.hash = 'sae=0&latent={latent}'")
        wait_for(driver, "tr.context", 30)
        times["latent_from_index_s"] = time.perf_counter() - t
        t = time.perf_counter()
        driver.get(index.as_uri() + f"#sae=0&latent={latent + 1}")
        wait_for(driver, "tr.context", 30)
        times["latent_fresh_load_s"] = time.perf_counter() - t
        return times
    finally:
        driver.quit()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latents", type=int, default=5120)
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--saes", type=int, default=1)
    p.add_argument("--json", type=Path, help="also write the figures here")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-inspect-") as tmp:
        root = Path(tmp)
        store = synthetic_store(root / "s.zarr", a.tokens)
        sample = store.read_acts("train", LAYER, 0, 4096)
        saes = [str(sparse_sae(root / f"sae{i}", a.latents, sample, i)) for i in range(a.saes)]
        t = time.perf_counter()
        index = build(InspectConfig(sae=saes, store=str(store.path), out=str(root / "features")))
        build_s = time.perf_counter() - t
        size = sum(f.stat().st_size for f in (root / "features").rglob("*") if f.is_file())
        figures = {"latents": a.latents, "tokens": a.tokens, "saes": a.saes, "build_s": build_s,
                   "browser_mb": size / 2**20, **page_times(index, a.latents // 2)}  # fmt: skip
    targets = {"build_s": 120, "index_s": 2.0, "latent_from_index_s": 0.5, "latent_fresh_load_s": 0.5}
    for k, v in figures.items():
        target = f"  (target ≤ {targets[k]})" if k in targets else ""
        print(f"{k:22} {v:10.3f}{target}" if isinstance(v, float) else f"{k:22} {v:>10}")
    if a.json:
        a.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
