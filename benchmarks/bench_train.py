"""Training-step benchmark: atmpipe vs SAELens and sparsify, the GEMM floor, ATM's overhead, peak RSS.

Every configuration (implementation × method × shape) runs in its own worker process (peers.py's
protocol), so its peak RSS is its own. The workers of one method are started together and driven in
interleaved rounds (atmpipe, peer, peer, GEMM, then rotated), one step each, after warm-up steps that
are not timed; medians and min/max are reported. Peers run in .venv-peers, atmpipe in .venv.

    .venv/bin/python benchmarks/run_all.py            # the whole benchmark (make bench)
    .venv/bin/python benchmarks/bench_train.py --quick
    .venv/bin/python benchmarks/bench_train.py --profile topk --d-in 640 --d-sae 5120
    .venv/bin/python benchmarks/bench_train.py --breakdown relu --d-in 640 --d-sae 5120
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "benchmarks" / ".work"
# The interpreters of atmpipe's and the peers' workers (gpu.py points both at the GPU machine's python).
PYTHON = {"atmpipe": ROOT / ".venv" / "bin" / "python", "peers": ROOT / ".venv-peers" / "bin" / "python"}
DEVICE = "cpu"  # the workers' device (BENCH_DEVICE); gpu.py sets "cuda"
# The workers' precision (BENCH_PRECISION): "fp32", or "bf16": atmpipe's step with --precision bf16, the
# peers' steps under bf16 autocast (peers.py) and the GEMM floor in bf16. `run(precision=...)` sets it.
PRECISION = os.environ.get("BENCH_PRECISION", "fp32")
BATCH = 4096
THREADS = 2
SHAPES = {"small": (640, 5120), "large": (2304, 18432)}
K = 32  # TopK's k for every implementation (peers.K is the same)
L0 = 64  # ReLU, JumpReLU and ATM are timed at this L0 (as after warm-up): see calibrate_l0
WIDE = (2304, 65536, 1024)  # the paper's width: d_in, d_sae, and a batch that fits 2 cores' time
STEP_OFFSET = 500_000  # atmpipe's step index: past every warm-up (λ ramps, ATM's warm-up and r ramp)
TOTAL_STEPS = 1_000_000


# ----------------------------------------------------------------------------- synthetic activations


def make_acts(d_in: int, n_tokens: int, seed: int = 0) -> np.ndarray:
    """Residual-stream-like activations: sparse non-negative codes over planted unit atoms, plus a mean and noise."""
    rng = np.random.default_rng(seed)
    n_atoms, active = 8 * d_in, 32
    atoms = rng.standard_normal((n_atoms, d_in), dtype=np.float32)
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    idx = rng.integers(0, n_atoms, size=(n_tokens, active))
    coef = rng.exponential(1.0, size=(n_tokens, active)).astype(np.float32)
    x = np.zeros((n_tokens, d_in), np.float32)
    for j in range(active):  # one atom per token at a time: memory stays flat
        x += coef[:, j, None] * atoms[idx[:, j]]
    x += (
        rng.standard_normal(d_in, dtype=np.float32) * 0.5
    )  # a shared mean direction, as residual streams have
    x += 0.05 * rng.standard_normal((n_tokens, d_in), dtype=np.float32)
    return x.astype(np.float32)


def acts_file(d_in: int, n_batches: int) -> Path:
    """The activations every worker (atmpipe and peers) reads: written once, seeded, git-ignored."""
    path = WORK / f"acts_d{d_in}_n{n_batches * BATCH}.npy"
    if not path.exists():
        WORK.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, make_acts(d_in, n_batches * BATCH))
        tmp.rename(path)
    return path


# ----------------------------------------------------------------------------- atmpipe's worker side


def calibrate_l0(sae, x, l0: int) -> None:
    """Shift ReLU's / ATM's encoder bias (JumpReLU's thresholds) so that each latent fires on l0/d_sae of
    the batch x: the sparsity of a warmed-up SAE, which the sparse path depends on (a random SAE fires on
    half of its latents). The peers' dense steps cost the same at any sparsity."""
    import torch

    with torch.no_grad():
        pre = sae.pre_acts(x)
        q = pre.kthvalue(round(x.shape[0] * (1 - l0 / sae.cfg.d_sae)), dim=0).values
        if sae.method == "jumprelu":
            sae.log_threshold.copy_(q.clamp_min(1e-3).log())
        else:
            sae.b_enc.sub_(q)


def atmpipe_step(
    method: str, d_in: int, d_sae: int, device, l0: int = L0, autocast: bool = True, precision: str = "fp32"
) -> Callable:
    """One atmpipe training step: `atmpipe.train.train_step` (the loop's body) with the trainer's defaults,
    ReLU / JumpReLU / ATM calibrated to L0 ≈ l0 on the first batch (0: left as initialised).

    precision: the step's `atmpipe train --precision` ("bf16": the products in bf16 under autocast, weights
    fp32). On a GPU the forward runs under bf16 autocast (what the peers' GPU paths use too) unless autocast
    is False (fp32).
    """
    import torch

    from atmpipe.sae import SAEConfig, make_sae
    from atmpipe.train import TrainConfig, lr_factor, make_optimizer, train_step

    # Matryoshka (BatchTopK) is timed at k = l0 with its default nesting, beside TopK at the same k ("topk-l0").
    k = {"topk": K, "topk-l0": l0, "matryoshka": l0}.get(method)
    method = method.removesuffix("-l0")
    hparams = {"k": k} if k else {}
    cfg = TrainConfig(method=method, hparams=hparams)
    sae = make_sae(SAEConfig(method, d_in, d_sae, hparams)).to(device)
    sae.precision = precision
    opt = make_optimizer(sae, cfg)
    base_lrs = [g["lr"] for g in opt.param_groups]
    training_forward = sae.training_forward
    counter = iter(range(STEP_OFFSET, TOTAL_STEPS))
    calibrated: list = []

    def forward(x, i, total):
        if device.type != "cuda" or not autocast:
            return training_forward(x, i, total)
        with torch.autocast("cuda", torch.bfloat16):
            return training_forward(x, i, total)

    def step(x):
        if l0 and k is None and not calibrated:
            calibrated.append(calibrate_l0(sae, x, l0))
        i = next(counter)
        lr_scale = lr_factor(i, TOTAL_STEPS, cfg.warmup_steps, cfg.decay_frac)
        train_step(sae, forward, opt, base_lrs, x, i, TOTAL_STEPS, lr_scale, cfg.grad_clip)

    return step


def gemm_step(d_in: int, d_sae: int, device, precision: str = "fp32") -> Callable:
    """The floor's unit: one (batch × d_in) @ (d_in × d_sae) matmul (in `precision`; bf16 on a GPU)."""
    import torch

    dtype = torch.bfloat16 if device.type == "cuda" or precision == "bf16" else torch.float32
    w = torch.randn(d_in, d_sae, device=device, dtype=dtype)
    return lambda x: x.to(dtype) @ w


def atm_kernel_step(fused: bool, d_in: int, d_sae: int, device) -> Callable:
    """ATM's per-step work alone (statistics, importance, threshold, probabilities, masks, masking):
    ATMSAE.mask_latents with the fused compiled kernel or the eager reference, on one batch's latents."""
    import torch

    from atmpipe.sae import SAEConfig, compiling, make_sae

    compiling.set_compile(fused)  # the compile switch, as `atmpipe train --no-compile` sets it
    sae = make_sae(SAEConfig("atm", d_in, d_sae, {})).to(device).train()
    counter = iter(range(STEP_OFFSET, TOTAL_STEPS))
    latents: dict = {}

    @torch.no_grad()
    def step(x):
        if x.data_ptr() not in latents:  # the unmasked latents of this batch, computed once
            latents[x.data_ptr()] = sae.encode(x)
        sae.mask_latents(x, latents[x.data_ptr()], next(counter), TOTAL_STEPS)

    return step


def worker_main(a: argparse.Namespace) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from peers import claim_stdout, serve

    proto = claim_stdout()
    import atmpipe.sae  # noqa: F401  (imports before the baseline RSS, as the peers do)

    if a.method == "gemm":
        make = lambda device: gemm_step(a.d_in, a.d_sae, device, PRECISION)  # noqa: E731
    elif a.method in ("atm-fused", "atm-eager"):
        make = lambda device: atm_kernel_step(a.method == "atm-fused", a.d_in, a.d_sae, device)  # noqa: E731
    else:
        make = lambda device: atmpipe_step(a.method, a.d_in, a.d_sae, device, a.l0, precision=PRECISION)  # noqa: E731
    serve(make, a.data, a.batch, proto)


# ----------------------------------------------------------------------------- the parent side


@dataclass
class Worker:
    """A running configuration; `times` collects its timed steps."""

    impl: str
    method: str
    d_in: int
    d_sae: int
    data: Path
    batch: int = BATCH
    checkout: Path | None = None  # atmpipe's worker from another checkout (A/B: before vs after a change)
    times: list[float] = field(default_factory=list)
    rss: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        tag = f"@{self.checkout.name}" if self.checkout else ""
        return f"{self.impl}{tag}:{self.method}:{self.d_in}x{self.d_sae}"

    def start(self) -> None:
        env = dict(os.environ)
        if self.checkout:  # its own code, its own worker (which knows the four arguments below)
            cmd = [str(PYTHON["atmpipe"]), str(self.checkout / "benchmarks" / "bench_train.py"), "--worker"]
            env["PYTHONPATH"] = str(self.checkout)
        elif self.impl == "atmpipe":
            cmd = [
                str(PYTHON["atmpipe"]),
                str(Path(__file__).resolve()),
                "--worker",
                "--batch",
                str(self.batch),
            ]
        else:
            cmd = [str(PYTHON["peers"]), str(ROOT / "benchmarks" / "peers.py"), "--impl", self.impl]
            cmd += ["--batch", str(self.batch)]
        cmd += ["--method", self.method, "--d-in", str(self.d_in), "--d-sae", str(self.d_sae)]
        cmd += ["--data", str(self.data)]
        env = {
            **env,
            "BENCH_THREADS": str(THREADS),
            "OMP_NUM_THREADS": str(THREADS),
            "BENCH_DEVICE": DEVICE,
            "BENCH_PRECISION": PRECISION,
        }
        env["MKL_NUM_THREADS"] = str(THREADS)
        self.log = WORK / f"{self.name.replace(':', '_')}.log"
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log.open("w"),
            text=True,
            env=env,
            cwd=ROOT,
        )

    def ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            tail = "".join(self.log.read_text().splitlines(keepends=True)[-15:])
            raise RuntimeError(f"benchmark worker {self.name} died; last lines of {self.log}:\n{tail}")
        return json.loads(line)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write('{"cmd": "quit"}\n')
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def summary(times: list[float]) -> dict:
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "n": len(times)}


def run_group(workers: list[Worker], warmup: int, rounds: int, log: Callable[[str], None]) -> None:
    """Warm every worker up, then time one step per worker per round, rotating the order each round."""
    for w in workers:
        w.start()
    try:
        for w in workers:
            w.ask(cmd="steps", n=warmup)
        for r in range(rounds):
            order = workers[r % len(workers) :] + workers[: r % len(workers)]
            for w in order:
                w.times += w.ask(cmd="steps", n=1)["times"]
            log(
                f"  round {r + 1}/{rounds}: "
                + "  ".join(f"{w.impl}:{w.method} {w.times[-1]:.2f}s" for w in workers)
            )
        for w in workers:
            w.rss = w.ask(cmd="rss")
    finally:
        for w in workers:
            w.stop()


@dataclass
class Figure:
    """One printed line: a measured ratio against its target (ok is None where no target is set)."""

    name: str
    detail: str
    ratio: float
    target: str
    ok: bool | None
    unit: str = "×"

    def line(self) -> str:
        verdict = {True: "MET", False: "MISSED", None: "info"}[self.ok]
        return f"{self.name:<52} {self.detail:<84} target {self.target:<15} {verdict:<6} {self.ratio:.2f}{self.unit}"


def fmt(s: dict) -> str:
    return f"{s['median']:.3f}s [{s['min']:.3f}–{s['max']:.3f}]"


GROUPS = {  # the workers driven together, interleaved: each method with its peers and a GEMM timer
    "topk": [("atmpipe", "topk"), ("saelens", "topk"), ("sparsify", "topk"), ("atmpipe", "gemm")],
    "jumprelu": [("atmpipe", "jumprelu"), ("saelens", "jumprelu"), ("atmpipe", "gemm")],
    "relu": [("atmpipe", "relu"), ("atmpipe", "atm"), ("saelens", "relu"), ("atmpipe", "gemm")],
    "matryoshka": [
        ("atmpipe", "matryoshka"),
        ("atmpipe", "topk-l0"),
        ("saelens", "matryoshka"),
        ("atmpipe", "gemm"),
    ],
}


def run(
    quick: bool = False,
    log: Callable[[str], None] = print,
    shapes: list[tuple[int, int]] | None = None,
    plan: list[tuple[int, int]] | None = None,
    with_peers: bool = True,
    atm_kernel: bool = True,
    precision: str = "fp32",
) -> dict:
    """Run the step benchmark; returns {"figures": [Figure, ...], "raw": {...}}.

    shapes: (d_in, d_sae) pairs; plan: (warm-up steps, timed rounds) per shape; precision: every worker's
    (fp32, or bf16: figures named "bf16 ...", the floor a bf16 GEMM).
    """
    global PRECISION
    PRECISION = precision
    if with_peers and not Path(PYTHON["peers"]).exists():
        raise SystemExit(f"{PYTHON['peers']} is missing; run `make peers` (or benchmarks/run.sh) first")
    if shapes is None:
        shapes = [SHAPES["small"]] if quick else [SHAPES["small"], SHAPES["large"]]
        # The large shape costs ~15× more per step: fewer rounds there.
        plan = [(1, 3)] if quick else [(2, 7), (1, 2)]
    plan = plan or [(1, 3)] * len(shapes)
    figures: list[Figure] = []
    raw: dict = {
        "batch": BATCH,
        "threads": THREADS,
        "k": K,
        "device": DEVICE,
        "precision": precision,
        "configs": {},
    }
    label = "" if precision == "fp32" else f"{precision} "
    for (d_in, d_sae), (warmup, rounds) in zip(shapes, plan, strict=True):
        data = acts_file(d_in, 4 if d_in * d_sae < 2**24 else 2)
        res: dict[tuple[str, str], dict] = {}
        for method, members in GROUPS.items():
            members = [(i, m) for i, m in members if with_peers or i == "atmpipe"]
            log(
                f"[train] {method} at d_in {d_in}, d_sae {d_sae}, batch {BATCH}: {warmup} warm-up + {rounds} rounds"
            )
            workers = [Worker(impl, m, d_in, d_sae, data) for impl, m in members]
            run_group(workers, warmup, rounds, log)
            for w in workers:
                method_key = w.method if w.method != "gemm" else f"gemm@{method}"
                res[(w.impl, method_key)] = {**summary(w.times), "times": w.times, **w.rss}
                raw["configs"][f"{w.impl}:{method_key}:{d_in}x{d_sae}"] = res[(w.impl, method_key)]
        figures += shape_figures(res, f"{label}{d_in}/{d_sae}")
    if precision != "fp32":  # the figures below are the fp32 pass's
        return {"figures": figures, "raw": raw}
    if not quick and with_peers and atm_kernel:
        figures += wide_figures(log, raw)
    if not atm_kernel:
        return {"figures": figures, "raw": raw}
    # ATM's statistics-and-mask function, fused vs eager, at the largest d_sae measured.
    d_in, d_sae = max(shapes, key=lambda s: s[1])
    log(f"[train] ATM statistics+mask, fused vs eager, at d_sae {d_sae}")
    data = acts_file(d_in, 4 if d_in * d_sae < 2**24 else 2)
    workers = [Worker("atmpipe", m, d_in, d_sae, data) for m in ("atm-fused", "atm-eager")]
    run_group(workers, warmup=2, rounds=3 if quick else 5, log=log)
    fused, eager = summary(workers[0].times), summary(workers[1].times)
    raw["configs"].update({f"{w.name}": {**summary(w.times), "times": w.times} for w in workers})
    speedup = eager["median"] / fused["median"]
    figures.append(
        Figure(
            f"fused ATM / eager ATM (stats+mask, d_sae {d_sae})",
            f"fused {fmt(fused)} eager {fmt(eager)}",
            speedup,
            "≥ 2.00× @16k+",
            speedup >= 2.0 if d_sae >= 16384 else None,
        )
    )
    return {"figures": figures, "raw": raw}


def shape_figures(res: dict, tag: str) -> list[Figure]:
    figs = []
    peers = {"topk": ("saelens", "sparsify"), "jumprelu": ("saelens",), "relu": ("saelens",)}
    peers = {m: tuple(p for p in names if (p, m) in res) for m, names in peers.items()}
    peers = {m: names for m, names in peers.items() if names}
    for method, names in peers.items():
        ours = res[("atmpipe", method)]
        best = min(names, key=lambda p: res[(p, method)]["median"])
        theirs = res[(best, method)]
        speedup = theirs["median"] / ours["median"]
        others = ", ".join(f"{p} {res[(p, method)]['median']:.3f}s" for p in names)
        need = 1.2 if method == "topk" else 3.0  # the sparse path's target against SAELens's dense step
        figs.append(
            Figure(
                f"step {method} {tag} vs faster peer ({best})",
                f"atmpipe {fmt(ours)} vs {others}",
                speedup,
                f"≥ {need:.2f}× faster",
                speedup >= need,
            )
        )
    figs += matryoshka_figures(res, tag)
    if ("atmpipe", "atm") in res:
        atm, relu = res[("atmpipe", "atm")], res[("atmpipe", "relu")]
        figs.append(
            Figure(
                f"ATM step / ReLU step {tag}",
                f"atm {fmt(atm)} relu {fmt(relu)}",
                atm["median"] / relu["median"],
                "≤ 1.15×",
                atm["median"] / relu["median"] <= 1.15,
            )
        )
    for method, group in (("relu", "relu"), ("jumprelu", "jumprelu"), ("atm", "relu"), ("topk", "topk")):
        if ("atmpipe", method) not in res:
            continue
        gemm = res[("atmpipe", f"gemm@{group}")]
        ratio = res[("atmpipe", method)]["median"] / gemm["median"]
        figs.append(
            Figure(
                f"{method} step / 1-GEMM floor {tag}" + (f" (L0 {L0})" if method != "topk" else ""),
                f"step {res[('atmpipe', method)]['median']:.3f}s, GEMM {fmt(gemm)}",
                ratio,
                "≤ 1.60×" if method != "topk" else "none (≈1 GEMM)",
                ratio <= 1.6 if method != "topk" else None,
            )
        )
    # Training memory: peak RSS above the post-import baseline on CPU; peak allocated memory on a GPU.
    kind = "device" if DEVICE != "cpu" else "training"
    for method, names in peers.items():
        ours = res[("atmpipe", method)]
        mem = lambda r: r.get("peak_device_mb", r["peak_rss_mb"] - r["baseline_rss_mb"])  # noqa: E731
        best = min(names, key=lambda p: mem(res[(p, method)]))
        ratio = mem(ours) / mem(res[(best, method)])
        others = ", ".join(f"{p} {mem(res[(p, method)]):.0f}" for p in names)
        figs.append(
            Figure(
                f"peak {'RSS' if kind == 'training' else 'GPU memory'} {method} {tag} vs leanest peer ({best})",
                f"{kind} MB atmpipe {mem(ours):.0f} vs {others} (total {ours['peak_rss_mb']:.0f})",
                ratio,
                "≤ 1.00×",
                ratio <= 1.0,
            )
        )
    return figs


def matryoshka_figures(res: dict, tag: str) -> list[Figure]:
    """Matryoshka (k = L0) against atmpipe's TopK at the same k, and against SAELens's Matryoshka."""
    if ("atmpipe", "matryoshka") not in res:
        return []
    ours, topk = res[("atmpipe", "matryoshka")], res[("atmpipe", "topk-l0")]
    figs = [
        Figure(f"matryoshka step / topk step {tag} (k {L0})", f"matryoshka {fmt(ours)} topk {fmt(topk)}",
               ours["median"] / topk["median"], "≤ 1.30×", ours["median"] / topk["median"] <= 1.3),
    ]  # fmt: skip
    if ("saelens", "matryoshka") in res:
        theirs = res[("saelens", "matryoshka")]
        speedup = theirs["median"] / ours["median"]
        figs.append(
            Figure(f"step matryoshka {tag} vs saelens", f"atmpipe {fmt(ours)} vs saelens {fmt(theirs)}",
                   speedup, "≥ 2.00× faster", speedup >= 2.0)
        )  # fmt: skip
    return figs


def matryoshka_only(rounds: int, large_peers: bool, log: Callable[[str], None] = print) -> dict:
    """The Matryoshka group alone (atmpipe's Matryoshka and TopK at k = L0, SAELens's Matryoshka, the GEMM):
    `rounds` timed rounds at 640/5120, half as many at 2304/18432, there without SAELens unless large_peers
    (its dense step costs ~8 GEMMs at that shape: minutes per step on loaded cores)."""
    global GROUPS
    saved, GROUPS = GROUPS, {"matryoshka": GROUPS["matryoshka"]}
    try:
        small = run(shapes=[SHAPES["small"]], plan=[(1, rounds)], log=log, atm_kernel=False)
        large = run(shapes=[SHAPES["large"]], plan=[(1, max(1, rounds // 2))], log=log, atm_kernel=False,
                    with_peers=large_peers)  # fmt: skip
    finally:
        GROUPS = saved
    small["raw"]["configs"].update(large["raw"]["configs"])
    return {"figures": small["figures"] + large["figures"], "raw": small["raw"]}


def precision_figures(fp32: dict, bf16: dict, units: bool) -> list[Figure]:
    """atmpipe's bf16 step against its fp32 step, and the bf16 GEMM against the fp32 one, per method and shape,
    from the raw results of an fp32 and a bf16 run(). Targets: ≥ 2.5× at 2304/18432, ≥ 2× at 640/5120;
    informational only on a CPU without bf16 units (`units` False), where bf16 is emulated and slow."""
    figs = []
    for key, t16 in bf16["configs"].items():
        t32 = fp32["configs"].get(key)
        impl, method, shape = key.split(":")
        if t32 is None or impl != "atmpipe":
            continue
        d_in, d_sae = map(int, shape.split("x"))
        need = 2.5 if d_in >= 2304 else 2.0
        ratio = t32["median"] / t16["median"]
        what = "GEMM" if method.startswith("gemm") else f"{method} step"
        if method.startswith("gemm") and not method.endswith("@relu"):
            continue  # one floor per shape
        figs.append(Figure(f"atmpipe bf16 / fp32 {what} {d_in}/{d_sae}",
                           f"fp32 {fmt(t32)} bf16 {fmt(t16)}" + ("" if units else " (no bf16 units)"),
                           ratio, "info" if what == "GEMM" else f"≥ {need:.2f}× faster",
                           None if what == "GEMM" or not units else ratio >= need))  # fmt: skip
    return figs


def wide_figures(log: Callable[[str], None], raw: dict, warmup: int = 1, rounds: int = 2) -> list[Figure]:
    """TopK at the paper's width (d_sae 65,536, d_in 2304) vs sparsify: step and peak RSS, at WIDE's batch."""
    d_in, d_sae, batch = WIDE
    log(f"[train] topk at d_in {d_in}, d_sae {d_sae}, batch {batch}: {warmup} warm-up + {rounds} rounds")
    data = acts_file(d_in, 2)
    workers = [
        Worker(i, m, d_in, d_sae, data, batch)
        for i, m in (("atmpipe", "topk"), ("sparsify", "topk"), ("atmpipe", "gemm"))
    ]
    run_group(workers, warmup, rounds, log)
    res = {(w.impl, w.method): {**summary(w.times), "times": w.times, **w.rss} for w in workers}
    raw["configs"].update({f"{w.name}:batch{batch}": res[(w.impl, w.method)] for w in workers})
    ours, theirs, gemm = res[("atmpipe", "topk")], res[("sparsify", "topk")], res[("atmpipe", "gemm")]
    mem = lambda r: r["peak_rss_mb"] - r["baseline_rss_mb"]  # noqa: E731
    tag = f"{d_in}/{d_sae} batch {batch}"
    return [
        Figure(f"step topk {tag} vs sparsify", f"atmpipe {fmt(ours)} vs sparsify {fmt(theirs)}, GEMM {fmt(gemm)}",
               theirs["median"] / ours["median"], "≥ 1.20× faster", theirs["median"] / ours["median"] >= 1.2),
        Figure(f"peak RSS topk {tag} vs sparsify", f"training MB atmpipe {mem(ours):.0f} vs sparsify {mem(theirs):.0f}",
               mem(ours) / mem(theirs), "≤ 1.00×", mem(ours) <= mem(theirs)),
    ]  # fmt: skip


def crossover(
    d_in: int = 640, d_sae: int = 5120, densities=(0.01, 0.02, 0.05, 0.1, 0.2), rounds: int = 3
) -> dict:
    """The ReLU step on the sparse vs the dense path at several latent densities, interleaved in one
    process: where the sparse path stops winning (sparse.CROSSOVER_DENSITY is set from this)."""
    import torch

    torch.set_num_threads(THREADS)
    x = torch.from_numpy(np.load(acts_file(d_in, 4 if d_in < 1000 else 2))[:BATCH])
    steps = {}
    for density in densities:
        for path in ("sparse", "dense"):
            torch.manual_seed(0)
            steps[(density, path)] = atmpipe_step(
                "relu", d_in, d_sae, torch.device("cpu"), round(density * d_sae)
            )
    for (_, path), step in steps.items():
        _set_latents(step, path)
    times = interleaved_times(steps, [x], warmup=1, rounds=rounds)  # the warm-up round calibrates
    out = {}
    for density in densities:
        s, d = (statistics.median(times[(density, p)]) for p in ("sparse", "dense"))
        out[f"{density:.2f}"] = {"sparse_s": s, "dense_s": d, "dense_over_sparse": d / s}
        print(f"density {density:5.1%}: sparse {s:.3f}s dense {d:.3f}s  dense/sparse {d / s:.2f}", flush=True)
    return out


def interleaved_times(steps: dict, xs: list, warmup: int, rounds: int) -> dict[object, list[float]]:
    """Every step once a round, in the same order, after `warmup` untimed rounds, on batches xs in turn
    (synchronised on CUDA): {key: the seconds of its timed rounds}."""
    import torch

    sync = torch.cuda.synchronize if xs[0].is_cuda else lambda: None
    times: dict = {key: [] for key in steps}
    for r in range(warmup + rounds):
        for key, step in steps.items():
            sync()
            t0 = time.perf_counter()
            step(xs[r % len(xs)])
            sync()
            if r >= warmup:
                times[key].append(time.perf_counter() - t0)
    return times


def _set_latents(step: Callable, path: str) -> None:
    """The SAE inside an atmpipe_step closure, set to one path."""
    for cell in step.__closure__ or ():
        for name in ("latent_path", "latents"):  # "latents" in checkouts from before its rename
            if hasattr(cell.cell_contents, name):
                setattr(cell.cell_contents, name, path)


def ab(checkout: Path, methods=("relu", "jumprelu", "atm", "topk"), rounds: int = 3, log=print) -> dict:
    """Before / after: this checkout's step against another checkout's (e.g. main before a change), the
    workers interleaved, at make reproduce's sizes (640 → 5120, batch 4096); ours at L0 ≈ 64."""
    d_in, d_sae = SHAPES["small"]
    data = acts_file(d_in, 4)
    head = ["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"]
    out: dict = {
        "before": str(checkout),
        "before_commit": subprocess.run(head, capture_output=True, text=True).stdout.strip(),
    }
    for method in methods:
        log(f"[ab] {method}: {checkout} vs this checkout")
        workers = [
            Worker("atmpipe", method, d_in, d_sae, data, checkout=checkout),
            Worker("atmpipe", method, d_in, d_sae, data),
        ]
        run_group(workers, 1, rounds, log)
        before, after = summary(workers[0].times), summary(workers[1].times)
        out[method] = {"before": before, "after": after, "speedup": before["median"] / after["median"]}
        log(
            f"  {method}: before {fmt(before)} after {fmt(after)}: {before['median'] / after['median']:.2f}× faster"
        )
    return out


# ----------------------------------------------------------------------------- profiling


def profile(method: str, d_in: int, d_sae: int, steps: int = 3) -> None:
    """torch.profiler table of atmpipe's step (run in .venv): where the time goes."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.set_num_threads(THREADS)
    x = torch.from_numpy(np.load(acts_file(d_in, 4 if d_in < 1000 else 2))[:BATCH])
    torch.manual_seed(0)
    step = atmpipe_step(method, d_in, d_sae, torch.device("cpu"))
    for _ in range(2):
        step(x)
    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            step(x)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


# Profiler op names by where the step's time goes (`breakdown`); the first matching group wins.
OP_GROUPS = {
    "dense GEMMs": ("aten::mm", "aten::addmm", "aten::bmm"),
    "sparse entries (gather, scatter, sparse products)": (
        "embedding_bag", "index_add", "sparse", "nonzero", "index_select", "gather", "scatter",
    ),
    "optimizer (Adam) and gradient clipping": ("adam", "norm", "foreach", "clamp"),
}  # fmt: skip


def breakdown(method: str, d_in: int, d_sae: int, steps: int = 5) -> dict:
    """Where one atmpipe step's time goes, in units of one dense (batch × d_in) @ (d_in × d_sae) GEMM:
    torch.profiler's self CPU time per op, summed by `OP_GROUPS`, over `steps` steps after warm-up."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.set_num_threads(THREADS)
    x = torch.from_numpy(np.load(acts_file(d_in, 4 if d_in < 1000 else 2))[:BATCH])
    torch.manual_seed(0)
    step = atmpipe_step(method, d_in, d_sae, torch.device("cpu"))
    gemm = gemm_step(d_in, d_sae, torch.device("cpu"))
    for _ in range(2):  # warm-up
        step(x)
        gemm(x)
    gemm_s = []
    for _ in range(steps):
        t = time.perf_counter()
        gemm(x)
        gemm_s.append(time.perf_counter() - t)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            step(x)
        wall = (time.perf_counter() - t) / steps
    unit = statistics.median(gemm_s)
    groups, other = dict.fromkeys([*OP_GROUPS, "other ops"], 0.0), {}
    for ev in prof.key_averages():
        name, gemms = ev.key.lower(), ev.self_cpu_time_total / 1e6 / steps / unit
        group = next((g for g, keys in OP_GROUPS.items() if any(k in name for k in keys)), "other ops")
        groups[group] += gemms
        if group == "other ops":
            other[ev.key] = gemms
    return {
        "method": method, "d_in": d_in, "d_sae": d_sae, "l0": L0, "batch": BATCH, "gemm_s": unit,
        "step_s": wall, "step_gemms": wall / unit, "gemms_by_group": groups,
        "largest_other_ops": dict(sorted(other.items(), key=lambda t: -t[1])[:8]),
    }  # fmt: skip


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="atmpipe training-step benchmark")
    p.add_argument("--quick", action="store_true", help="small shape only, few rounds (a smoke run)")
    p.add_argument(
        "--profile", metavar="METHOD", help="print a torch.profiler table of atmpipe's METHOD step"
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method")
    p.add_argument("--d-in", type=int, default=640)
    p.add_argument("--d-sae", type=int, default=5120)
    p.add_argument("--data")
    p.add_argument("--batch", type=int, default=BATCH)
    p.add_argument("--l0", type=int, default=L0, help=argparse.SUPPRESS)
    p.add_argument("--crossover", action="store_true", help="ReLU step, sparse vs dense, over densities")
    p.add_argument(
        "--breakdown", metavar="METHOD", help="where METHOD's step time goes, in dense-GEMM units (profiler)"
    )
    p.add_argument(
        "--ab", metavar="CHECKOUT", help="step time of another checkout vs this one (before/after)"
    )
    p.add_argument(
        "--json", metavar="FILE", help="with --crossover / --ab / --breakdown: also write the result here"
    )
    p.add_argument(
        "--large-only",
        type=int,
        metavar="ROUNDS",
        help="the step figures at the large shape alone, atmpipe's steps and the GEMM only (no peers), over "
        "ROUNDS timed rounds: a closer look at a ratio the default 2 rounds there leave noisy",
    )
    p.add_argument(
        "--matryoshka",
        type=int,
        metavar="ROUNDS",
        help="the Matryoshka figures alone (vs TopK at the same k and SAELens's Matryoshka), ROUNDS timed "
        "rounds at 640/5120 and half as many (at least 1) at 2304/18432",
    )
    p.add_argument(
        "--no-large-peers", action="store_true", help="with --matryoshka: no SAELens at 2304/18432"
    )
    return p.parse_args()


def main() -> None:
    a = parse_args()
    if a.matryoshka:
        result = matryoshka_only(a.matryoshka, large_peers=not a.no_large_peers)
        for fig in result["figures"]:
            print(fig.line())
        if a.json:
            Path(a.json).write_text(
                json.dumps({"load_avg_at_end": os.getloadavg(), **result}, indent=1, default=vars) + "\n"
            )
        return
    if a.crossover or a.ab:
        import platform

        result = crossover() if a.crossover else ab(Path(a.ab).resolve())
        meta = {
            "load_avg_at_end": os.getloadavg(),
            "host": platform.node(),
            "threads": THREADS,
            "batch": BATCH,
        }
        if a.json:
            Path(a.json).write_text(json.dumps({**meta, "result": result}, indent=1) + "\n")
        return
    if a.breakdown:
        result = breakdown(a.breakdown, a.d_in, a.d_sae)
        print(json.dumps(result, indent=1))
        if a.json:
            Path(a.json).write_text(
                json.dumps({"load_avg_at_end": os.getloadavg(), **result}, indent=1) + "\n"
            )
        return
    if a.worker:
        worker_main(a)
    elif a.profile:
        profile(a.profile, a.d_in, a.d_sae)
    elif a.large_only:
        result = run(shapes=[SHAPES["large"]], plan=[(1, a.large_only)], with_peers=False)
        for fig in result["figures"]:
            print(fig.line())
        if a.json:
            Path(a.json).write_text(
                json.dumps({"load_avg_at_end": os.getloadavg(), **result}, indent=1, default=vars) + "\n"
            )
    else:
        for fig in run(quick=a.quick)["figures"]:
            print(fig.line())


if __name__ == "__main__":
    main()
