"""Shuffled-stream throughput, side by side in one run (each target is printed beside its figure; benchmarks/README.md).

    .venv/bin/python benchmarks/bench_stream.py [--quick]

Figures (one line each, the ratio last):
  * stream vs trainer: tokens/s the stream delivers (d_in 640, batch 4096) over tokens/s an atmpipe TopK
    step consumes (d_sae 5120) — target ≥ 10×;
  * stream vs raw memmap: the same over a plain numpy memmap of the same float32 bytes read as random
    4096-row batches, gathered as the stream gathers (sorted rows, np.take into a fresh tensor; page cache
    warm for both) — target ≥ 0.5×;
  * direct chunk reads vs zarr's (info): CPU time per batch (all the stream's threads) of the same stream
    with every chunk read through zarr's get_basic_selection instead of atmpipe.stream.ChunkReader,
    interleaved with it, over the direct one's;
  * the bound decoding puts on that ratio (info): per 4096-row chunk the stream must Blosc-decode and
    crc32c-check it (timed alone, one thread, as in the stream's decode workers) and gather a batch as the
    memmap does, so with every core busy and nothing else running its ratio is at most
    cores × gather / (decode + gather), in CPU time (what the pieces cost, whatever the load);
  * fed by the stream vs in-memory: a training step consuming the stream over the same step on one fixed
    batch (informational: 1.0× means the trainer never waits for data).
The stream is timed from its creation over several epochs: its start-up (counting rows, filling the first
shuffle buffer, which nothing overlaps) is counted, amortised as in a training run. A and B are measured
alternately, several rounds, and medians compared.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import google_crc32c
import numcodecs
import numpy as np
import torch
from numcodecs import Blosc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from atmpipe.sae import SAEConfig, make_sae  # noqa: E402
from atmpipe.store import compressors, open_store, write_arrays_store  # noqa: E402
from atmpipe.stream import ChunkReader, ShardStream  # noqa: E402
from atmpipe.train import train_step  # noqa: E402

D_IN, D_SAE, BATCH, CHUNK = 640, 5120, 4096, 4096


def make_data(root: Path, n_chunks: int) -> tuple[Path, Path]:
    """A store and a raw .npy of the same activations (Gaussian: like real ones, they barely compress)."""
    acts = np.random.default_rng(0).standard_normal((n_chunks * CHUNK, D_IN), dtype=np.float32)
    positions = np.arange(len(acts)) % 128
    splits = {
        "train": {"acts": acts, "positions": positions, "bos": positions == 0},
        "eval": {"acts": acts[:CHUNK]},
    }
    store = write_arrays_store(
        root / "bench.zarr", splits, layer=0, chunk_tokens=CHUNK, shard_tokens=8 * CHUNK
    )
    np.save(root / "raw.npy", acts)
    return store.path, root / "raw.npy"


def trainer_step(seed: int = 0) -> Callable[[torch.Tensor], None]:
    """One atmpipe TopK training step, `atmpipe.train.train_step` (the fastest method: the most demanding consumer)."""
    torch.manual_seed(seed)
    sae = make_sae(SAEConfig("topk", D_IN, D_SAE, {"k": 64}))
    opt = torch.optim.Adam(sae.param_groups(3e-4), betas=sae.adam_betas)
    base_lrs = [g["lr"] for g in opt.param_groups]
    state = {"step": 0}

    def step(x: torch.Tensor) -> None:
        train_step(sae, sae.training_forward, opt, base_lrs, x, state["step"], 10_000, 1.0, 1.0)
        state["step"] += 1

    return step


def timed(fn: Callable[[], None], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def timed_cpu(fn: Callable[[], None], n: int) -> float:
    """CPU seconds per call of this process (all its threads)."""
    start = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - start) / n


def figure(name: str, detail: str, ratio: float, target: str, ok: bool | None) -> dict:
    return {"name": name, "detail": detail, "ratio": ratio, "target": target, "ok": ok, "unit": "×"}


def line(f: dict) -> str:
    verdict = {True: "MET", False: "MISSED", None: "info"}[f["ok"]]
    return (
        f"{f['name']:<52} {f['detail']:<84} target {f['target']:<15} {verdict:<6} {f['ratio']:.2f}{f['unit']}"
    )


def stream_batch_times(
    store, seed: int, direct: bool, n_batches: int, buffer_chunks: int
) -> tuple[float, float]:
    """(wall, process CPU) seconds per batch of a stream timed from its creation; `direct=False`: every chunk
    read through zarr instead of ChunkReader. CPU time counts all the stream's threads: on a loaded machine
    it tells the cost of a read path where wall time mostly tells the scheduler's share."""
    no_reader = classmethod(lambda cls, root, array: None)
    with mock.patch.object(ChunkReader, "for_array", ChunkReader.for_array if direct else no_reader):
        start, cpu = time.perf_counter(), time.process_time()
        with ShardStream(store, 0, BATCH, seed=seed, buffer_chunks=buffer_chunks, log=lambda m: None) as s:
            for _ in range(n_batches):
                next(s)
        return (time.perf_counter() - start) / n_batches, (time.process_time() - cpu) / n_batches


def decode_timer(raw: np.ndarray) -> tuple[Callable[[], float], Callable[[], bool]]:
    """What one chunk costs to decode, alone: the store's own Blosc settings on the same activations, then
    the crc32c check; one Blosc thread, as in the stream's decode workers. Returns (CPU seconds per chunk,
    whether the last decode gave the activations back)."""
    blosc = compressors()[0]
    codec = Blosc(blosc.cname.value, blosc.clevel, getattr(Blosc, blosc.shuffle.value.upper()))
    encoded = np.frombuffer(codec.encode(np.ascontiguousarray(raw[:CHUNK])), np.uint8)
    decoded = np.empty((CHUNK, D_IN), np.float32)

    def decode_chunk() -> None:
        google_crc32c.value(encoded)
        codec.decode(encoded, out=decoded)

    def timed_decode() -> float:
        threads, numcodecs.blosc.use_threads = numcodecs.blosc.use_threads, False
        try:
            return timed_cpu(decode_chunk, 8)
        finally:
            numcodecs.blosc.use_threads = threads

    return timed_decode, lambda: np.array_equal(decoded, raw[:CHUNK])


def measure(root: Path, n_chunks: int, buffer_chunks: int, epochs: int, rounds: int, steps: int) -> dict:
    """Every timing, in alternating rounds: the stream (direct and zarr reads), the memmap baseline, one
    chunk's decoding, then the trainer fed by the stream or by one fixed batch."""
    store_path, raw_path = make_data(root, n_chunks)
    store = open_store(store_path)
    raw = np.load(raw_path, mmap_mode="r")
    rng = np.random.default_rng(1)
    raw[:].sum()  # warm the page cache for the baseline, as the store's writes warmed it for the stream

    def memmap_batch() -> None:  # gathered exactly as the stream gathers a batch from its buffer
        rows = np.sort(rng.choice(len(raw), BATCH, replace=False))
        np.take(raw, rows, axis=0, out=torch.empty((BATCH, D_IN)).numpy(), mode="clip")

    timed_decode, decoded_right = decode_timer(raw)
    names = ("stream_s", "zarr_s", "stream_cpu", "zarr_cpu", "memmap_s", "memmap_cpu", "decode_cpu")
    t: dict[str, list[float]] = {name: [] for name in (*names, "fed_s", "fixed_s")}
    n_batches = epochs * (n_chunks - 1)  # BOS tokens removed: a little under n_chunks batches per epoch
    for r in range(rounds):
        for kind, direct in (("stream", True), ("zarr", False)):
            wall, cpu = stream_batch_times(store, r, direct, n_batches, buffer_chunks)
            t[f"{kind}_s"].append(wall)
            t[f"{kind}_cpu"].append(cpu)
        cpu = time.process_time()
        t["memmap_s"].append(timed(memmap_batch, n_chunks - 1))  # one thread: its CPU time is its cost
        t["memmap_cpu"].append((time.process_time() - cpu) / (n_chunks - 1))
        t["decode_cpu"].append(timed_decode())
    assert decoded_right()
    # Then the trainer, fed by the stream (whose thread decodes beside it) or by one fixed batch.
    step = trainer_step()
    fixed = torch.from_numpy(np.array(raw[:BATCH]))
    step(fixed)  # allocator and kernels warmed
    with ShardStream(store, 0, BATCH, seed=99, buffer_chunks=buffer_chunks) as feed:
        for _ in range(rounds):
            t["fed_s"].append(timed(lambda: step(next(feed)), steps))
            t["fixed_s"].append(timed(lambda: step(fixed), steps))
    return t


def figures_of(t: dict, n_chunks: int, trainer_tokens_per_s: float | None) -> tuple[list[dict], dict]:
    """The figures, and the raw numbers they come from."""
    med = {name: statistics.median(values) for name, values in t.items()}
    stream_rate, memmap_rate = BATCH / med["stream_s"], BATCH / med["memmap_s"]
    trainer = trainer_tokens_per_s or BATCH / med["fixed_s"]
    # The bound in CPU time (single-threaded pieces: what they cost, whatever share the scheduler gives).
    gather, decode, cores = med["memmap_cpu"], med["decode_cpu"], os.cpu_count() or 1
    raw_out = {
        "stream_tokens_per_s": stream_rate,
        "memmap_tokens_per_s": memmap_rate,
        "trainer_tokens_per_s": trainer,
        "trainer_source": "bench_train (fastest atmpipe method)"
        if trainer_tokens_per_s
        else "measured here (TopK)",
        "fed_step_s": t["fed_s"],
        "fixed_step_s": t["fixed_s"],
        "stream_batch_s": t["stream_s"],
        "stream_zarr_reads_batch_s": t["zarr_s"],
        "stream_batch_cpu_s": t["stream_cpu"],
        "stream_zarr_reads_batch_cpu_s": t["zarr_cpu"],
        "memmap_batch_s": t["memmap_s"],
        "memmap_batch_cpu_s": t["memmap_cpu"],
        "decode_chunk_cpu_s": t["decode_cpu"],
        "cores": cores,
        "store_tokens": n_chunks * CHUNK,
    }
    figures = [
        figure(
            "stream: shuffled batches vs trainer consumption",
            f"stream {stream_rate:,.0f} tok/s vs trainer {trainer:,.0f} tok/s (d 640, d_sae 5120, batch 4096)",
            stream_rate / trainer,
            "≥ 10×",
            stream_rate / trainer >= 10,
        ),
        figure(
            "stream: shuffled batches vs raw memmap random read",
            f"stream {stream_rate:,.0f} tok/s vs memmap random rows {memmap_rate:,.0f} tok/s ("
            f"CPU {med['stream_cpu'] * 1e3:.1f} vs {med['memmap_cpu'] * 1e3:.1f} ms/batch)",
            stream_rate / memmap_rate,
            "≥ 0.5×",
            stream_rate / memmap_rate >= 0.5,
        ),
        figure(
            "stream: direct chunk reads vs zarr's reads",
            f"CPU {med['stream_cpu'] * 1e3:.1f} vs {med['zarr_cpu'] * 1e3:.1f} ms per batch "
            f"through zarr (wall {med['stream_s'] * 1e3:.1f} vs {med['zarr_s'] * 1e3:.1f})",
            med["zarr_cpu"] / med["stream_cpu"],
            "info",
            None,
        ),
        figure(
            "stream: bound from decoding alone",
            f"CPU per 4096-row chunk: Blosc+crc32c {decode * 1e3:.1f} ms + gather {gather * 1e3:.1f} ms, {cores} cores",
            cores * gather / (decode + gather),
            "info",
            None,
        ),
        figure(
            "stream: train step fed by the stream vs in-memory",
            f"step {med['fed_s']:.3f}s fed vs {med['fixed_s']:.3f}s on a fixed batch",
            med["fed_s"] / med["fixed_s"],
            "≈ 1× (info)",
            None,
        ),
    ]
    return figures, raw_out


def run(
    quick: bool = False, trainer_tokens_per_s: float | None = None, log: Callable[[str], None] = print
) -> dict:
    # The stream is timed from its creation to the last batch of `epochs` epochs (each two or more shuffle
    # buffers): nothing it prepared while other figures were measured can flatter it, and its start-up
    # weighs on the rate as it would early in a training run, not more.
    n_chunks, buffer_chunks, epochs, rounds, steps = (16, 8, 2, 3, 2) if quick else (64, 32, 4, 5, 4)
    with tempfile.TemporaryDirectory(prefix="atmpipe-bench-stream-") as tmp:
        t = measure(Path(tmp), n_chunks, buffer_chunks, epochs, rounds, steps)
    figures, raw_out = figures_of(t, n_chunks, trainer_tokens_per_s)
    for f in figures:
        log(line(f))
    return {"figures": figures, "raw": raw_out}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: a small store and few rounds")
    run(quick=p.parse_args().quick)
