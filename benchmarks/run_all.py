"""Run every benchmark, print one line per figure (its target, then the ratio last), write a JSON result.

    .venv/bin/python benchmarks/run_all.py            # what `make bench` runs (via benchmarks/run.sh)
    .venv/bin/python benchmarks/run_all.py --quick    # a smoke run: small shapes, few rounds

Results go to benchmarks/results/<date>-<host>.json (`-quick` appended for a smoke run). Every figure
is a ratio measured side by side in this run (each target is printed beside its figure; benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import inspect
import json
import os
import platform
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import THREADS, Figure  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def figure_from_dict(d: dict) -> Figure:
    """A figure reported by another benchmark module as a plain dict (same fields as Figure)."""
    return Figure(
        d["name"], d.get("detail", ""), float(d["ratio"]), d["target"], d.get("ok"), d.get("unit", "×")
    )


def run_module(name: str, quick: bool, **kwargs) -> dict | None:
    """Call benchmarks/<name>.py's run(); None (with a printed line) if that benchmark does not exist yet."""
    try:
        module = importlib.import_module(name)
    except ImportError as e:
        print(f"[{name}] not available ({e})", flush=True)
        return None
    accepted = inspect.signature(module.run).parameters
    return module.run(quick=quick, **{k: v for k, v in kwargs.items() if k in accepted})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: small shapes and few repeats")
    p.add_argument(
        "--only", choices=["train", "stream", "harvest"], action="append", help="run only these parts"
    )
    p.add_argument(
        "--bf16",
        choices=["auto", "on", "off"],
        default="auto",
        help="the bf16 figures beside fp32: auto (default) where the CPU has bf16 units, on, off",
    )
    a = p.parse_args()
    parts = a.only or ["train", "stream", "harvest"]
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
    import torch

    torch.set_num_threads(THREADS)
    started = time.time()
    stamp = datetime.datetime.now()
    print(
        f"atmpipe benchmarks {stamp:%Y-%m-%d %H:%M} on {socket.gethostname()} ({platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}), torch {torch.__version__}, {THREADS} threads"
        + (", QUICK" if a.quick else ""),
        flush=True,
    )
    figures: list[Figure] = []
    raw: dict = {}

    def log(msg: str) -> None:
        print(msg, flush=True)

    from atmpipe.precision import cpu_has_bf16_units

    units = cpu_has_bf16_units()
    bf16 = a.bf16 == "on" or (a.bf16 == "auto" and units)
    if not bf16:
        log("[bf16] skipped: " + ("--bf16 off" if a.bf16 == "off" else "this CPU has no bf16 units (AMX or "
            "AVX512-BF16), where a bf16 GEMM runs tens of times slower than fp32; --bf16 on measures it anyway"))  # fmt: skip
    if "train" in parts:
        out = run_module("bench_train", a.quick, log=log)
        figures += out["figures"]
        raw["train"] = out["raw"]
        if bf16:
            import bench_train

            out16 = run_module("bench_train", a.quick, log=log, precision="bf16")
            figures += out16["figures"] + bench_train.precision_figures(out["raw"], out16["raw"], units)
            raw["train_bf16"] = out16["raw"]
    # The stream must outpace the fastest trainer: pass atmpipe's best measured step rate (tokens/s).
    consumption = None
    if "train" in raw:
        steps = [
            v["median"]
            for k, v in raw["train"]["configs"].items()
            if k.startswith("atmpipe:")
            and ":640x5120" in k
            and k.split(":")[1] in ("topk", "jumprelu", "relu", "atm")
        ]
        consumption = raw["train"]["batch"] / min(steps) if steps else None
    for name, kwargs in (("stream", {"trainer_tokens_per_s": consumption}), ("harvest", {"bf16": bf16})):
        if name not in parts:
            continue
        out = run_module(f"bench_{name}", a.quick, log=log, **kwargs)
        if out is None:
            continue
        figures += [figure_from_dict(d) for d in out.get("figures", [])]
        raw[name] = out

    print("\nsummary: one line per figure, the ratio last" + " (quick: not for quoting)" * a.quick)
    for fig in figures:
        print(fig.line())
    missed = [f.name for f in figures if f.ok is False]
    print(
        f"{sum(f.ok is True for f in figures)} met, {len(missed)} missed, {sum(f.ok is None for f in figures)} informational"
        f" — {time.time() - started:.0f} s"
    )
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": THREADS}
    write_record(stamp, started, a.quick, figures, raw, **machine)


def write_record(
    stamp, started: float, quick: bool, figures: list[Figure], raw: dict, tag: str = "", **machine
):
    """Write benchmarks/results/<date>-<host>[-tag][-quick].json: every figure plus the raw measurements."""
    import torch

    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{stamp:%Y-%m-%d}-{socket.gethostname()}{tag}{'-quick' if quick else ''}.json"
    record = {
        "date": stamp.isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        **machine,
        "torch": torch.__version__,
        "quick": quick,
        "seconds": round(time.time() - started, 1),
        "figures": [vars(f) for f in figures],
        "raw": raw,
    }
    path.write_text(json.dumps(record, indent=1, default=str) + "\n")
    print(f"wrote {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")
    return path


if __name__ == "__main__":
    main()
