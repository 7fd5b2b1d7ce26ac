"""Harvest benchmarks (each target is printed beside its figure; benchmarks/README.md), all ratios measured side by side in one run.

1. harvest efficiency: tokens/s of the whole harvest stage (`harvest(cfg, lm)`: corpus, capture, checks,
   storage encoding, statistics, compressed sharded writes, commits) / tokens/s of a bare forward pass of
   the same model stopped at the same layer, same batches and dtype. A and B interleaved; medians.
   Target ≥ 0.90.
2. store write: tokens/s the StoreWriter sustains on real activations / the harvest rate. Target ≥ 5.
3. codecs (informational): compression ratio and write speed of candidate codecs on real residuals —
   the measurement behind store.compressors().

    .venv/bin/python benchmarks/bench_harvest.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from atmpipe.harvest import HarvestConfig, harvest  # noqa: E402
from atmpipe.lm import capture, load_lm  # noqa: E402
from atmpipe.store import StoreWriter, acts_name, open_store, plan_split  # noqa: E402


def _figure(name, detail, ratio, target, ok, unit="×"):
    return {"name": name, "detail": detail, "ratio": ratio, "target": target, "ok": ok, "unit": unit}


def _bare_forward(lm, windows: np.ndarray, layer: int, batch: int) -> float:
    """Seconds for the forward passes alone (capture stops after `layer`), same batches as harvest."""
    t0 = time.perf_counter()
    for start in range(0, len(windows), batch):
        capture(lm, torch.from_numpy(windows[start : start + batch].astype(np.int64)), [layer])
    return time.perf_counter() - t0


def _codec_candidates():
    from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

    return {
        "none": [Crc32cCodec()],
        "blosc-lz4-shuffle": [BloscCodec(cname="lz4", clevel=1, shuffle="shuffle"), Crc32cCodec()],
        "blosc-lz4-bitshuffle": [BloscCodec(cname="lz4", clevel=1, shuffle="bitshuffle"), Crc32cCodec()],
        "blosc-zstd1-shuffle": [BloscCodec(cname="zstd", clevel=1, shuffle="shuffle"), Crc32cCodec()],
        "zstd1": [ZstdCodec(level=1), Crc32cCodec()],
    }


def _measure_codecs(acts: np.ndarray, chunk: int, workdir: Path, rounds: int) -> dict:
    import zarr

    out = {}
    for name, codecs in _codec_candidates().items():
        times, ratio = [], None
        for r in range(rounds):
            path = workdir / f"codec-{name}-{r}.zarr"
            arr = zarr.create_array(path, shape=acts.shape, dtype=acts.dtype, chunks=(chunk, acts.shape[1]),
                                    shards=(len(acts), acts.shape[1]), compressors=codecs)  # fmt: skip
            t0 = time.perf_counter()
            arr[:] = acts
            times.append(time.perf_counter() - t0)
            ratio = acts.nbytes / sum(f.stat().st_size for f in (path / "c").rglob("*") if f.is_file())
        out[name] = {"ratio": ratio, "write_MBps": acts.nbytes / 1e6 / statistics.median(times)}
    return out


def bf16_figures(model: str, layer: int, cfg: dict, rounds: int, tmp: Path, log=print) -> tuple[list, dict]:
    """The harvest with the LM in bf16 against fp32, and against a bare bf16 forward, interleaved (the
    speed-up needs a CPU with bf16 units: elsewhere a bf16 forward runs tens of times slower)."""
    from atmpipe.precision import cpu_has_bf16_units

    lms = {"fp32": load_lm(model, dtype="float32"), "bf16": load_lm(model, dtype="bfloat16")}
    times: dict[str, list[float]] = {"harvest fp32": [], "harvest bf16": [], "bare bf16": []}
    for r in range(rounds + 1):  # round 0 warms up
        for name, lm in lms.items():
            t0 = time.perf_counter()
            path = harvest(HarvestConfig(**cfg, out=str(tmp / f"{name}{r}.zarr")), lm=lm)
            if r:
                times[f"harvest {name}"].append(time.perf_counter() - t0)
        windows = open_store(path).split("train").tokens[:].reshape(-1, cfg["context_size"])
        bare = _bare_forward(lms["bf16"], windows, layer, cfg["batch_size"])
        if r:
            times["bare bf16"].append(bare)
            log(f"[harvest] bf16 round {r}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()))
    rate = {k: cfg["tokens"] / statistics.median(v) for k, v in times.items()}
    units = cpu_has_bf16_units()
    speedup, efficiency = (
        rate["harvest bf16"] / rate["harvest fp32"],
        rate["harvest bf16"] / rate["bare bf16"],
    )
    note = "" if units else " (no bf16 units on this CPU)"
    figures = [
        _figure("harvest bf16 / harvest fp32", f"{rate['harvest bf16']:,.0f} vs {rate['harvest fp32']:,.0f} tok/s{note}",
                speedup, "≥ 2.50× faster", speedup >= 2.5 if units else None),
        _figure("bf16 harvest efficiency (harvest / bare bf16 forward)",
                f"{rate['harvest bf16']:,.0f} vs {rate['bare bf16']:,.0f} tok/s{note}", efficiency, "≥ 0.90",
                efficiency >= 0.9 if units else None),
    ]  # fmt: skip
    return figures, {"times": times, "tokens_per_s": rate}


def run(
    quick: bool = False, log=print, model: str = "gemma-3-270m", layer: int | None = None, bf16: bool = False
) -> dict:
    torch.set_num_threads(torch.get_num_threads())
    lm = load_lm(model, dtype="float32")  # the fp32 figures (bf16_figures has its own)
    layer = lm.n_layers // 2 if layer is None else layer
    context, batch = 128, 8 if quick else 16
    windows_per_run = batch * (2 if quick else 4)
    rounds = 2 if quick else 3
    tokens = windows_per_run * context
    log(f"[harvest] {lm.name} layer {layer}, {lm.dtype}, {lm.device}: {tokens} tokens per run, batch {batch}")

    with tempfile.TemporaryDirectory(prefix="atmpipe-bench-") as tmp:
        tmp = Path(tmp)
        cfg = dict(model=model, layers=[layer], tokens=tokens, eval_tokens=0, context_size=context, batch_size=batch,
                   chunk_tokens=batch * context, shard_tokens=2 * batch * context, overwrite=True)  # fmt: skip
        # Warm-up run: loads the corpus (cached per process) and touches every code path once.
        store_path = harvest(HarvestConfig(**cfg, out=str(tmp / "warm.zarr")), lm=lm)
        windows = open_store(store_path).split("train").tokens[:].reshape(-1, context)
        _bare_forward(lm, windows[:batch], layer, batch)
        t_harvest, t_bare = [], []
        for r in range(rounds):  # interleaved A/B
            t0 = time.perf_counter()
            harvest(HarvestConfig(**cfg, out=str(tmp / f"run{r}.zarr")), lm=lm)
            t_harvest.append(time.perf_counter() - t0)
            t_bare.append(_bare_forward(lm, windows, layer, batch))
            log(f"[harvest] round {r}: harvest {t_harvest[-1]:.2f}s, bare forward {t_bare[-1]:.2f}s")
        harvest_rate = tokens / statistics.median(t_harvest)
        bare_rate = tokens / statistics.median(t_bare)

        # Store writes alone, on the real activations just harvested (synchronous: put + close).
        acts = open_store(tmp / "run0.zarr").read_acts("train", layer)
        shard_rows = 8 * 4096 if not quick else 4 * 4096
        reps = max(1, shard_rows // len(acts) + 1)
        big = np.concatenate([acts] * reps)[: (len(acts) * reps // 4096) * 4096]
        n = len(big)
        plans = {"train": plan_split(n, 4096, min(shard_rows, n), 4096)}
        attrs = {"model": {"name": "bench", "source": "bench", "config_hash": "-", "n_layers": lm.n_layers},
                 "layers": [layer], "hook_names": {}, "d_model": lm.d_model, "dtype": "float32", "context_size": 128,
                 "seed": 0, "tokenizer": {}, "dataset": {}, "splits": plans}  # fmt: skip
        bos = np.zeros(n, bool)
        bos[::context] = True
        write_times = []
        for r in range(rounds):
            t0 = time.perf_counter()
            writer = StoreWriter(tmp / f"write{r}.zarr", attrs, overwrite=True)
            step = plans["train"]["shard_tokens"]
            for i in range(plans["train"]["n_shards"]):
                sl = slice(i * step, (i + 1) * step)
                writer.put_shard("train", i, {acts_name(layer): big[sl], "tokens": np.zeros(len(big[sl]), np.int32),
                                              "positions": np.zeros(len(big[sl]), np.int32), "bos": bos[sl]})  # fmt: skip
            writer.close()
            write_times.append(time.perf_counter() - t0)
        write_rate = n / statistics.median(write_times)
        codecs = _measure_codecs(big[: 4 * 4096], 4096, tmp, rounds)
        precision = bf16_figures(model, layer, cfg, rounds, tmp, log) if bf16 else ([], {})

    efficiency = harvest_rate / bare_rate
    figures = [
        _figure("harvest efficiency (harvest / bare forward)",
                f"{harvest_rate:,.0f} vs {bare_rate:,.0f} tok/s, {lm.name} L{layer} batch {batch}×{context}",
                efficiency, "≥ 0.90", efficiency >= 0.90),
        _figure("store write vs harvest rate",
                f"{write_rate:,.0f} vs {harvest_rate:,.0f} tok/s (fp32, d {lm.d_model}, lz4 bitshuffle + crc32c)",
                write_rate / harvest_rate, "≥ 5", write_rate / harvest_rate >= 5),
    ] + precision[0]  # fmt: skip
    base = codecs["none"]["write_MBps"]
    for name, c in codecs.items():
        figures.append(_figure(f"codec {name}: size ratio", f"{c['write_MBps']:,.0f} MB/s ({c['write_MBps'] / base:.2f}× none)",
                               c["ratio"], "info", None))  # fmt: skip
    return {
        "figures": figures,
        "harvest_tokens_per_s": harvest_rate,
        "bare_forward_tokens_per_s": bare_rate,
        "store_write_tokens_per_s": write_rate,
        "times": {"harvest": t_harvest, "bare": t_bare, "write": write_times},
        "codecs": codecs,
        "tokens_per_run": tokens,
        "bf16": precision[1],
    }


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument(
        "--bf16", action="store_true", help="also the harvest with the LM in bf16 (needs bf16 units)"
    )
    a = p.parse_args()
    result = run(quick=a.quick, bf16=a.bf16)
    for f in result["figures"]:
        print(f"{f['name']:<48} {f['detail']:<70} target {f['target']:<7} {f['ratio']:.2f}{f['unit']}")
