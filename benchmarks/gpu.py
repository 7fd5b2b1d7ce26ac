"""The GPU benchmark (prepared for one H200; run by benchmarks/gpu.sh, under 5 minutes).

1. Harvest: tokens/s of atmpipe's harvest with a randomly initialised Gemma-2-2b-shaped model (same
   architecture, random weights, no download) vs its bare forward stopped at the same layer.
2. Latent paths: every method's sparse vs dense step at d_in 2304 / d_sae 65536 / batch 4096, in fp32
   (as `atmpipe train` runs) and under bf16 autocast, at L0 64 and 512: where the sparse step wins on
   CUDA (`sparse.CUDA_CROSSOVER_DENSITY` rests on this measurement).
3. Training steps per method at d_in 2304 / d_sae 65536 / batch 4096 under bf16 autocast, against
   SAELens and sparsify when they are importable there (carried as wheels), plus the bf16 GEMM floor
   and ATM's fused vs eager statistics-and-mask function.
4. Profile (only with --parts profile): the device time per op of TopK's and ReLU's fp32 steps.

`--parts` picks among paths, harvest, train (the default: all three) and profile. Workers are the same as on CPU (bench_train.py / peers.py), with BENCH_DEVICE=cuda and the machine's
python for both atmpipe and the peers. Results: benchmarks/results/<date>-<host>-gpu.json.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import itertools
import os
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train  # noqa: E402
from bench_train import Figure  # noqa: E402
from run_all import figure_from_dict, write_record  # noqa: E402

SHAPE = (2304, 65536)

# Gemma-2-2b's shape (google/gemma-2-2b config.json): the harvest model is this, randomly initialised.
GEMMA2_2B = dict(
    vocab_size=256000,
    hidden_size=2304,
    intermediate_size=9216,
    num_hidden_layers=26,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=256,
    max_position_embeddings=8192,
    sliding_window=4096,
    query_pre_attn_scalar=256,
    final_logit_softcapping=30.0,
    attn_logit_softcapping=50.0,
)


def peers_importable() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("sae_lens", "sparsify"))


def run_train(quick: bool) -> dict:
    bench_train.PYTHON = {"atmpipe": Path(sys.executable), "peers": Path(sys.executable)}
    bench_train.DEVICE = "cuda"
    with_peers = peers_importable()
    if not with_peers:
        print(
            "[gpu] sae_lens / sparsify are not importable here: atmpipe only (carry their wheels for the peers)"
        )
    return bench_train.run(
        log=lambda m: print(m, flush=True),
        shapes=[SHAPE],
        plan=[(3, 5 if quick else 15)],
        with_peers=with_peers,
        quick=quick,
    )


def run_latent_paths(quick: bool, device: str = "cuda", l0s=(64, 512), precisions=("fp32", "bf16")) -> dict:
    """Every method's sparse vs dense step at SHAPE, batch 4096, in fp32 (what `atmpipe train` runs) and
    under bf16 autocast, interleaved in this process (each pair built, timed and freed before the next:
    ~5 GB per SAE with Adam). TopK's L0 is its k (32) whatever l0 says."""
    import numpy as np
    import torch

    d_in, d_sae = SHAPE
    device = torch.device(device)
    batches = np.load(bench_train.acts_file(d_in, 2)).reshape(2, -1, d_in)
    xs = [torch.from_numpy(b).to(device) for b in batches]
    out: dict = {}
    for precision, method in itertools.product(precisions, ("topk", "relu", "jumprelu", "atm")):
        for l0 in l0s[:1] if method == "topk" else l0s:
            key = f"{method}@L0 {bench_train.K if method == 'topk' else l0} {precision}"
            try:
                steps = {}
                for path in ("sparse", "dense"):
                    torch.manual_seed(0)
                    steps[path] = bench_train.atmpipe_step(
                        method, d_in, d_sae, device, l0, precision == "bf16"
                    )
                    bench_train._set_latents(steps[path], path)
                out[key] = time_pair(steps, xs, (2, 5) if quick else (3, 10))
                s, d = out[key]["sparse_s"], out[key]["dense_s"]
                print(
                    f"[paths] {key}: sparse {s * 1e3:.2f} ms  dense {d * 1e3:.2f} ms  dense/sparse {d / s:.2f}"
                )
            except Exception as e:  # a path that fails on CUDA is itself the answer for that row
                out[key] = {"error": f"{type(e).__name__}: {e}"}
                print(f"[paths] {key}: FAILED {type(e).__name__}: {e}")
            finally:
                steps = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return out


def time_pair(steps: dict, xs: list, plan: tuple[int, int]) -> dict:
    """The sparse and the dense step, interleaved (bench_train.interleaved_times); medians and their ratio."""
    times = bench_train.interleaved_times(steps, xs, *plan)
    s, d = (statistics.median(times[p]) for p in ("sparse", "dense"))
    return {"sparse_s": s, "dense_s": d, "dense_over_sparse": d / s, "times": times}


def run_profile(quick: bool, device: str = "cuda", methods=("topk", "relu")) -> dict:
    """Where each method's fp32 step spends its device time at SHAPE, L0 64: torch.profiler's self time per
    op over 3 steps after warm-up, the largest 12 ops, in ms a step."""
    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile

    d_in, d_sae = SHAPE
    device = torch.device(device)
    x = torch.from_numpy(np.load(bench_train.acts_file(d_in, 2))[: bench_train.BATCH]).to(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    out: dict = {}
    for method in methods:
        torch.manual_seed(0)
        step = bench_train.atmpipe_step(method, d_in, d_sae, device, autocast=False)
        for _ in range(3):
            step(x)
        with profile(activities=activities) as prof:
            for _ in range(3):
                step(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
        attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        ops = sorted(prof.key_averages(), key=lambda e: -getattr(e, attr))[:12]
        out[method] = {e.key: getattr(e, attr) / 3e3 for e in ops}
        print(f"[profile] {method}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in out[method].items()))
        del step
    return out


def random_gemma2(tokenizer_dir: Path, out: Path) -> Path:
    """A Gemma-2-2b-shaped model with random weights (bf16) saved with a real tokenizer, for the harvest."""
    import torch
    from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg = Gemma2Config(**{**GEMMA2_2B, "vocab_size": len(tok)}, **ids)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Gemma2ForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    del model
    torch.cuda.empty_cache()
    return out


def run_harvest(quick: bool) -> dict | None:
    """bench_harvest's figures (harvest vs bare forward, store writes) with the random Gemma-2-2b-shaped model."""
    tokenizer_dir = Path(os.environ.get("GPU_TOKENIZER", "/tmp/atmpipe-gpu-tokenizer"))  # set by gpu.sh
    try:
        import bench_harvest
    except ImportError as e:
        print(f"[gpu] harvest benchmark not available ({e})")
        return None
    if not (tokenizer_dir / "tokenizer.json").exists():
        print(
            f"[gpu] {tokenizer_dir} is missing (gpu.sh unpacks it; `gpu.sh --prepare` makes it): harvest not measured"
        )
        return None
    model_dir = random_gemma2(tokenizer_dir, Path("/tmp/atmpipe-gemma2-2b-random"))
    return bench_harvest.run(quick=quick, model=str(model_dir), log=lambda m: print(m, flush=True))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument(
        "--parts", default="paths,harvest,train", help="which of paths, harvest, train, profile to run"
    )
    a = p.parse_args()
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("gpu.py: no CUDA device is visible; run it on the GPU machine (benchmarks/gpu.sh)")
    started, stamp = time.time(), datetime.datetime.now()
    name = torch.cuda.get_device_name()
    print(
        f"atmpipe GPU benchmarks {stamp:%Y-%m-%d %H:%M} on {socket.gethostname()}: {name}, torch {torch.__version__}"
    )
    figures: list[Figure] = []
    raw: dict = {}
    parts = a.parts.split(",")
    raw["latent_paths"] = paths = run_latent_paths(a.quick) if "paths" in parts else {}
    for key, r in paths.items():
        if "error" not in r:
            ratio = r["dense_over_sparse"]
            detail = f"sparse {r['sparse_s'] * 1e3:.2f} ms vs dense {r['dense_s'] * 1e3:.2f} ms"
            figures.append(
                Figure(f"dense/sparse step {key} {SHAPE[0]}/{SHAPE[1]}", detail, ratio, "info", None)
            )
    if "profile" in parts:
        raw["profile"] = run_profile(a.quick)
    harvest = run_harvest(a.quick) if "harvest" in parts else None
    if harvest is not None:
        raw["harvest"] = harvest
        figures += [figure_from_dict(d) for d in harvest.get("figures", [])]
    if "train" in parts:
        train = run_train(a.quick)
        raw["train"] = train["raw"]
        figures += train["figures"]
    print()
    for fig in figures:
        print(fig.line())
    write_record(stamp, started, a.quick, figures, raw, tag="-gpu", device=name)


if __name__ == "__main__":
    main()
