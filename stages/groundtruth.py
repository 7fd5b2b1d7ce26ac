"""The ground-truth arena (`make groundtruth`; docs/groundtruth.md): SAEs scored against a known dictionary
and known parent/child hierarchies.

1. data: SAELens's `sae_lens.synthetic` draws a dictionary, a hierarchy and samples per shape and seed
   (stages/groundtruth_synth.py, run in .venv-peers; files pass between the venvs);
2. stores: each sample becomes an atmpipe Zarr store (train split, held-out eval split);
3. train: every method of stages/groundtruth.toml, at every cell (shape × SAE width) and seed, through
   atmpipe's train stage (`atmpipe.train.train(load_train_config(...))`, what `atmpipe train` runs; the
   equivalent command lines are written to WORK/commands.sh). Workers are long-lived processes: starting
   Python and torch costs more than training one of these SAEs;
4. evaluate: SAELens's synthetic metrics and absorption on the known hierarchy (.venv-peers), and ATM's
   masking diagnostics (atmpipe.eval.metrics.masking) with p on the parents' and the children's latents;
5. summarise: per cell and method, the mean over seeds with a 95% Student-t interval, and ATM against its
   controls paired by seed; results.json and table.md under --results, the table printed.

Every step skips what is finished (a finished SAE has its atmpipe.json; an evaluation its eval.json), so
re-running resumes after an interruption.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import shlex
import subprocess
import sys
import time
import tomllib
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from rich.console import Console
from scipy.stats import t as student_t

ROOT = Path(__file__).resolve().parents[1]
SYNTH = ROOT / "stages" / "groundtruth_synth.py"
console = Console(stderr=True)


def fail(message: str) -> None:
    """Bad input: one line on stderr, exit code 2, as atmpipe's own commands do."""
    console.print(f"error: {message}", highlight=False, soft_wrap=True)
    raise SystemExit(2)


# --- the plan --------------------------------------------------------------------------------------


def load_plan(path: Path, seeds: list[int] | None) -> dict:
    plan = tomllib.loads(path.read_text())
    if seeds is not None:
        plan["seeds"] = seeds
    return plan


def data_spec(plan: dict, shape: str, seed: int) -> dict:
    return {**plan["data"], "seed": seed, "hierarchy": plan["shapes"][shape]}


def sae_jobs(plan: dict, work: Path) -> list[dict]:
    """One job per cell, seed and method: where its data, store and run directory are."""
    jobs = []
    for cell in plan["cells"]:
        for seed in plan["seeds"]:
            for method in plan["methods"]:
                data = work / "data" / f"{cell['shape']}-s{seed}"
                jobs.append({
                    "cell": cell["name"], "shape": cell["shape"], "d_sae": cell["d_sae"], "seed": seed,
                    "method": method, "data": data, "store": work / "stores" / f"{cell['shape']}-s{seed}.zarr",
                    "out": work / "runs" / cell["name"] / f"s{seed}" / method["name"],
                    "target_l0": plan["shapes"][cell["shape"]]["target_l0"],
                })  # fmt: skip
    return jobs


def train_flags(job: dict, sizes: str) -> tuple[list[str], dict, dict]:
    """Recipes, flags and --hparam values of one job's `atmpipe train`."""
    from atmpipe.sae import SAE_METHODS

    method = job["method"]
    recipes = [*method["recipes"], sizes]
    base = _recipe_method(recipes)
    takes_k = any(f.name == "k" for f in _fields(SAE_METHODS[base].Params))
    l0 = {"k": job["target_l0"]} if takes_k else {"target_l0": float(job["target_l0"])}
    flags = {"store": str(job["store"]), "d_sae": job["d_sae"], "seed": job["seed"], "out": str(job["out"]),
             "resume": True}  # fmt: skip
    return recipes, flags, {**method.get("hparams", {}), **l0}


def _recipe_method(recipes: list[str]) -> str:
    method = None
    for r in recipes:
        method = tomllib.loads((ROOT / r).read_text()).get("method", method)
    return method


def _fields(cls):
    import dataclasses

    return dataclasses.fields(cls)


def command_line(recipes: list[str], flags: dict, hparams: dict) -> str:
    words = ["atmpipe", "train"]
    for r in recipes:
        words += ["--config", r]
    for k, v in flags.items():
        words += [f"--{k.replace('_', '-')}"] if v is True else [f"--{k.replace('_', '-')}", str(v)]
    for k, v in hparams.items():
        words += ["--hparam", f"{k}={json.dumps(v)}"]
    return shlex.join(words)


# --- steps -----------------------------------------------------------------------------------------


def run_peers(peers: Path, command: str, jobs: list[dict], work: Path, progress, label: str) -> None:
    """stages/groundtruth_synth.py COMMAND over `jobs` in one .venv-peers process, one tick per job done."""
    if not jobs:
        return
    jobs_file = work / f"{command}-jobs.json"
    jobs_file.write_text(json.dumps(jobs, default=str))
    task = progress.add_task(label, total=len(jobs))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([str(peers), str(SYNTH), command, str(jobs_file)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    for line in proc.stdout:
        if line.startswith(("generated", "evaluated")):
            progress.advance(task)
    err = proc.stderr.read()
    if proc.wait() != 0:
        raise SystemExit(f"{SYNTH.name} {command} failed:\n{err[-3000:]}")


def write_stores(plan: dict, work: Path, progress) -> None:
    from safetensors.numpy import load_file

    from atmpipe.store import open_store, write_arrays_store

    todo = []
    for shape in sorted({c["shape"] for c in plan["cells"]}):
        for seed in plan["seeds"]:
            path = work / "stores" / f"{shape}-s{seed}.zarr"
            with contextlib.suppress(Exception):
                if open_store(path).complete:
                    continue
            todo.append((path, work / "data" / f"{shape}-s{seed}"))
    task = progress.add_task("stores", total=len(todo))
    for path, data in todo:
        arrays = load_file(str(data / "data.safetensors"))
        splits = {"train": {"acts": arrays["train_acts"]}, "eval": {"acts": arrays["eval_acts"]}}
        write_arrays_store(path, splits, layer=0, chunk_tokens=4096, shard_tokens=65_536)
        progress.advance(task)


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)  # tiny matrices: one thread each, workers side by side


def train_one(recipes: list[str], flags: dict, hparams: dict, log: str) -> str | None:
    """atmpipe's train stage on one job, its console to `log`; None, or the error's line."""
    from atmpipe.errors import UserError
    from atmpipe.train import load_train_config, train

    with open(log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        try:
            train(load_train_config([str(ROOT / r) for r in recipes], hparams=hparams, **flags))
        except UserError as e:
            print(f"error: {e}")
            return str(e)
    return None


def train_all(jobs: list[dict], sizes: str, workers: int, work: Path, progress) -> int:
    lines = [command_line(*train_flags(j, sizes)) for j in jobs]
    (work / "commands.sh").write_text("# what stages/groundtruth.py trains, as atmpipe train command lines\n"
                                      + "\n".join(lines) + "\n")  # fmt: skip
    todo = [j for j in jobs if not (j["out"] / "atmpipe.json").exists()]
    task = progress.add_task("train", total=len(jobs), completed=len(jobs) - len(todo))
    ctx = get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init) as pool:
        futures = {}
        for j in todo:
            j["out"].mkdir(parents=True, exist_ok=True)
            log = str(j["out"].parent / f"{j['method']['name']}.log")
            futures[pool.submit(train_one, *train_flags(j, sizes), log)] = j
        for fut in as_completed(futures):
            if (error := fut.result()) is not None:
                fail(f"training {futures[fut]['out']} failed: {error}")
            progress.advance(task)
    return len(todo)


# --- results ---------------------------------------------------------------------------------------

METRICS = {  # key in one SAE's record → (table header, digits)
    "l0": ("L0", 2),
    "mcc": ("MCC", 3),
    "uniqueness": ("uniqueness", 3),
    "f1": ("F1", 3),
    "precision": ("precision", 3),
    "recall": ("recall", 3),
    "shrinkage": ("shrinkage", 3),
    "explained_variance": ("expl. var.", 3),
    "dead_latents": ("dead", 1),
    "absorption": ("absorption", 3),
}
MASKING = {"targeting_index": "targeting index", "mean_p": "mean p", "p_parents": "p parents",
           "p_children": "p children", "effective_masking_rate": "eff. masking rate",
           "frac_above_theta": "share above θ", "median_i_over_theta": "median I / θ"}  # fmt: skip


def record(job: dict) -> dict:
    """One SAE's numbers: SAELens's metrics, absorption and, for ATM, its masking diagnostics."""
    ev = json.loads((job["out"] / "eval.json").read_text())
    s = ev["saelens"]
    rec = {
        "l0": s["sae_l0"], "mcc": s["mcc"], "uniqueness": s["uniqueness"], "f1": s["classification"]["f1_score"],
        "precision": s["classification"]["precision"], "recall": s["classification"]["recall"],
        "shrinkage": s["shrinkage"], "explained_variance": s["explained_variance"],
        "dead_latents": s["dead_latents"], "absorption": ev["absorption"]["rate"], "true_l0": ev["true_l0"],
        "absorbed_pairs": [ev["absorption"]["absorbed"], ev["absorption"]["eligible"]],
    }  # fmt: skip
    masking = atm_masking(job["out"], ev["matched_latents"])
    if masking is not None:
        rec["masking"] = masking
    return rec


def atm_masking(run: Path, matched: dict) -> dict | None:
    """atmpipe's masking diagnostics of an ATM SAE, plus mean p over the latents matched to parents and to
    children (each latent once)."""
    from atmpipe.eval.metrics.masking import diagnostics, stats_of
    from atmpipe.sae import SAE

    sae = SAE.load(run)
    stats = stats_of(sae)
    if stats is None:
        return None
    out = diagnostics(stats, sae.cfg.hparams)
    for name in ("hist_log10_importance", "hist_p"):
        out.pop(name)
    # Where the median latent sits under θ: near 0, p = 1 − exp(−r(θ − I)/θ) is 1 − exp(−r) for it.
    out["median_i_over_theta"] = out["importance_quantiles"][50] / out["theta"] if out["theta"] else None
    for group in ("parents", "children"):
        latents = sorted(set(matched[group]))
        out[f"p_{group}"] = float(stats["p"][latents].mean())
        out[f"importance_{group}"] = float(stats["I"][latents].mean())
    return out


def interval(values: list[float]) -> dict:
    """Mean over seeds and its 95% Student-t interval (the spread of the seeds: data draw and training)."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if len(v) == 0:
        return {"mean": None, "ci95": None, "n": 0}
    if len(v) < 2:
        return {"mean": float(v.mean()), "ci95": None, "n": 1}
    half = float(student_t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return {"mean": float(v.mean()), "ci95": [float(v.mean() - half), float(v.mean() + half)], "n": len(v)}


def summarise(plan: dict, jobs: list[dict]) -> dict:
    per_sae = {}
    for j in jobs:
        per_sae.setdefault(j["cell"], {}).setdefault(j["method"]["name"], {})[j["seed"]] = record(j)
    summary = {}
    for cell, methods in per_sae.items():
        summary[cell] = {}
        for method, seeds in methods.items():
            recs = [seeds[s] for s in sorted(seeds)]
            row = {k: interval([r[k] for r in recs]) for k in METRICS}
            if all("masking" in r for r in recs):
                row["masking"] = {k: interval([r["masking"][k] for r in recs]) for k in MASKING}
            summary[cell][method] = row
        summary[cell]["atm_vs_controls"] = {
            other: interval([methods["atm"][s]["absorption"] - methods[other][s]["absorption"] for s in methods["atm"]])
            for other in ("atm-uniform", "atm-log") if other in methods and "atm" in methods
        }  # fmt: skip
    return {"per_sae": per_sae, "summary": summary}


def _pm(e: dict, fmt: str) -> str:
    """Mean ± half-width of the interval, in format `fmt` (".3f", ".2g")."""
    if e["mean"] is None:
        return "—"
    if e["ci95"] is None:
        return f"{e['mean']:{fmt}}"
    return f"{e['mean']:{fmt}} ± {(e['ci95'][1] - e['ci95'][0]) / 2:{fmt}}"


def table(plan: dict, summary: dict) -> str:
    n = len(plan["seeds"])
    out = [f"Mean ± half-width of the 95% Student-t interval over {n} seeds (each seed: its own data draw and "
           "training run).", ""]  # fmt: skip
    for cell in plan["cells"]:
        rows = summary[cell["name"]]
        shape = plan["shapes"][cell["shape"]]
        out += [f"### {cell['name']}: {cell['shape']} hierarchy, {cell['d_sae']} latents for "
                f"{plan['data']['n_features']} true features, L0 target {shape['target_l0']}", ""]  # fmt: skip
        out.append("| method | " + " | ".join(h for h, _ in METRICS.values()) + " |")
        out.append("|---" * (len(METRICS) + 1) + "|")
        for m in plan["methods"]:
            r = rows[m["name"]]
            out.append(
                f"| {m['name']} | " + " | ".join(_pm(r[k], f".{d}f") for k, (_, d) in METRICS.items()) + " |"
            )
        out += ["", "| ATM masking | L0 | absorption | " + " | ".join(MASKING.values()) + " |",
                "|---" * (len(MASKING) + 3) + "|"]  # fmt: skip
        for name in ("atm", "atm-uniform", "atm-log"):
            if name in rows and "masking" in rows[name]:
                r = rows[name]
                cells = " | ".join(
                    _pm(r["masking"][k], ".2g" if k == "median_i_over_theta" else ".3f") for k in MASKING
                )
                out.append(f"| {name} | {_pm(r['l0'], '.2f')} | {_pm(r['absorption'], '.3f')} | {cells} |")
        for other, d in rows["atm_vs_controls"].items():
            ci = "—" if d["ci95"] is None else f"[{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"
            sep = "separated" if d["ci95"] and (d["ci95"][0] > 0 or d["ci95"][1] < 0) else "not separated"
            out.append(f"\nabsorption, atm − {other} (paired by seed): {d['mean']:+.3f} {ci} ({sep})")
        out.append("")
    return "\n".join(out)


# --- main ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plan", default="stages/groundtruth.toml")
    ap.add_argument("--work", default="runs/groundtruth", help="data, stores, runs (git-ignored)")
    ap.add_argument("--results", default="results/groundtruth", help="results.json and table.md")
    ap.add_argument("--peers", default=".venv-peers/bin/python", help="a Python with SAELens")
    ap.add_argument("--workers", type=int, default=2, help="training processes side by side")
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=None)
    args = ap.parse_args(argv)
    start = time.monotonic()
    plan, work, peers = load_plan(Path(args.plan), args.seeds), Path(args.work), Path(args.peers)
    if not peers.exists():
        fail(f"{peers} is missing; run `make peers` (the arena draws its data with SAELens) or pass --peers")
    work.mkdir(parents=True, exist_ok=True)
    jobs = sae_jobs(plan, work)
    from atmpipe.progress import Progress

    with Progress(console) as progress:
        data = {str(j["data"]): j for j in jobs if not (j["data"] / "truth.json").exists()}
        gen = [{"spec": data_spec(plan, j["shape"], j["seed"]), "out": k} for k, j in data.items()]
        run_peers(peers, "generate", gen, work, progress, "data (SAELens)")
        write_stores(plan, work, progress)
        n_trained = train_all(jobs, plan["sizes"], args.workers, work, progress)
        todo = [j for j in jobs if not (j["out"] / "eval.json").exists()]
        evals = [
            {"data": str(j["data"]), "sae": str(j["out"]), "out": str(j["out"] / "eval.json")} for j in todo
        ]
        run_peers(peers, "evaluate", evals, work, progress, "evaluate (SAELens)")
    results = summarise(plan, jobs)
    results["plan"] = plan
    used = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    results["this_invocation"] = {  # what it cost (finished SAEs skipped): wall, and CPU of every process
        "wall_s": round(time.monotonic() - start, 1),
        "cpu_s": round(sum(u.ru_utime + u.ru_stime for u in used), 1),
        "trained": n_trained,
        "evaluated": len(todo),
    }
    text = table(plan, results["summary"])
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "table.md").write_text("# Ground-truth arena\n\n" + text + "\n")
    print(text)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # this checkout's atmpipe, in the spawned workers too
    main()
