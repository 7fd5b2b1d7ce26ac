"""`make crosscheck`: atmpipe's absorption against SAEBench's own absorption eval, on the same SAEs and words.

Run with .venv-saebench's python (SAEBench 0.6 and its pins live there; `make saebench`):
    .venv-saebench/bin/python stages/crosscheck.py --out DIR [--words N --floor F --min-letters G --seeds 0,1,2,3,4]
        SAE_DIR [SAE_DIR ...]
    python stages/crosscheck.py rejudge DIR [DIR ...]     # the current pass rule on a crosscheck already run
1. atmpipe: `atmpipe eval --metrics absorption` (the main venv's atmpipe) on the given word sample, once per
   seed (the sample's own seed fixed: each seed varies split, examples and probes over the same words);
2. SAEBench: `sae_bench.evals.absorption.main.run_eval` on the same SAE directories (SAELens layout), its
   vocabulary replaced by atmpipe's word sample (same function, same seed; the sample's sha256 is checked),
   the model loaded by TransformerLens offline from atmpipe's converted checkpoint through a local
   Hugging Face cache layout; once per seed, its own randomness (probe init, split, examples) seeded;
3. both numbers per SAE and per letter, printed and written to DIR/crosscheck.{json,md} with versions and
   wall times. Pass: for full absorption and absorption fraction on every SAE, the Welch 95% interval of
   atmpipe's mean over its seeds minus SAEBench's lies inside ±0.05 (TOLERANCE), and every pair of SAEs that
   SAEBench separates beyond its own Welch interval over its seeds is ordered alike by atmpipe. Each interval
   is reported. (At least 2 seeds a side; 3 or more for an interval worth the name.)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LETTERS = "abcdefghijklmnopqrstuvwxyz"
HF_NAME = {"gemma-3-270m": "google/gemma-3-270m"}  # atmpipe's short name -> the name TransformerLens knows
METRICS = {"full": "mean_full_absorption", "fraction": "mean_absorption_fraction"}
# An SAE directory's weights: atmpipe.sae.base.WEIGHTS_FILE, repeated because that module needs the main
# venv's packages (zarr) and this script runs in .venv-saebench; tests/test_crosscheck.py keeps them equal.
WEIGHTS = "sae_weights.safetensors"
SAEBENCH_KEYS = {"full": "mean_full_absorption_score", "fraction": "mean_absorption_fraction_score"}
TOLERANCE = 0.05  # the Welch 95% interval of atmpipe − SAEBench must lie inside ± this, every SAE and metric


def hf_cache_layout(model_dir: Path, hub_name: str, cache: Path) -> Path:
    """A Hugging Face hub cache holding `hub_name` as links to atmpipe's converted checkpoint files."""
    repo = cache / "hub" / ("models--" + hub_name.replace("/", "--"))
    snap = repo / "snapshots" / "atmpipe-local"
    snap.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        if not (snap / f.name).exists():
            (snap / f.name).symlink_to(f.resolve())
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text("atmpipe-local")
    return cache


def run_atmpipe(args, out: Path, seed: int, ident: dict) -> dict:
    cmd = [args.atmpipe, "eval", "--metrics", "absorption", "--seed", str(seed), "--out", str(out)]
    cmd += [
        "--absorption-sample-words",
        str(args.words),
        "--absorption-min-words-per-letter",
        str(args.floor),
    ]
    cmd += ["--absorption-sample-seed", str(args.sample_seed)]
    cmd += ["--absorption-min-letters", str(args.min_letters)] + [f"--sae={s}" for s in args.saes]
    cmd += ["--store", args.store] if args.store else []
    print("$", " ".join(cmd), flush=True)
    start = time.time()
    subprocess.run(cmd, check=True)
    res = json.loads((out / "results.json").read_text())
    res |= {"seed": seed, "wall_s": time.time() - start, "command": " ".join(cmd), "identity": ident}
    (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    return res


def word_sample(model_dir: Path, args) -> list[str]:
    """atmpipe's own sample (its functions, its seed): the words SAEBench is given as its vocabulary."""
    sys.path.insert(0, str(ROOT))
    from transformers import AutoTokenizer

    from atmpipe.eval.compute.absorption import alphabetic_vocab, sample_vocab

    vocab = alphabetic_vocab(AutoTokenizer.from_pretrained(model_dir))
    return sample_vocab(vocab, args.words, args.floor, args.sample_seed)


def stop_after_layer(model_class, layer: int) -> None:
    """Make `model_class.run_with_cache` stop after block `layer`. SAEBench reads only that block's residual:
    stopping there leaves it unchanged (the forward is causal, block by block; tests/test_crosscheck.py checks
    it bit for bit) and skips the later blocks and the 262k-token unembedding.

    The other saving one might make, running the LM once for all SAEs, is not open without changing what
    SAEBench computes: its probe-split activations are already computed once and kept on disk, and each SAE's
    scoring prompts draw fresh in-context examples from the global `random` stream, which the SAEs before it
    have advanced, so no two SAEs see the same prompt batch."""
    if not hasattr(model_class, "_full_run_with_cache"):
        model_class._full_run_with_cache = model_class.run_with_cache
        model_class.run_with_cache = lambda self, *a, **kw: self._full_run_with_cache(
            *a, stop_at_layer=layer + 1, **kw
        )


def run_saebench(
    args, words: list[str], hub_name: str, layer: int, seed: int, work: Path, ident: dict
) -> dict:
    """SAEBench's absorption eval, unchanged but for its vocabulary, on every SAE, with one seed."""
    import numpy as np
    import torch
    from sae_bench.evals.absorption import common, feature_absorption
    from sae_bench.evals.absorption import main as sb_main
    from sae_bench.evals.absorption.eval_config import AbsorptionEvalConfig
    from sae_lens import SAE
    from transformer_lens import HookedTransformer

    stop_after_layer(HookedTransformer, layer)
    for module in (common, feature_absorption):  # both places SAEBench reads its word list from
        module.get_alpha_tokens = lambda tokenizer, **kw: list(words)
    probes = common.PROBES_DIR / hub_name.split("/")[-1] / f"layer_{layer}"
    shutil.rmtree(probes, ignore_errors=True)  # SAEBench reuses a probe on disk whatever it was trained on
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    cfg = AbsorptionEvalConfig(model_name=hub_name, random_seed=seed, min_feats_for_eval=args.min_letters)
    cfg.llm_batch_size, cfg.llm_dtype = 16, "float32"
    saes = [(Path(p).name, SAE.load_from_disk(p, device="cpu")) for p in args.saes]
    start = time.time()
    (work / f"seed{seed}").mkdir(parents=True, exist_ok=True)  # SAEBench writes its results there, unmade
    os.chdir(work)  # SAEBench writes artifacts/ under the working directory
    got = sb_main.run_eval(cfg, saes, "cpu", str(work / f"seed{seed}"), force_rerun=True)
    out = {}
    for name, _ in saes:
        r = next((v for k, v in got.items() if k.startswith(name + "_")), None)
        if r is None:  # SAEBench stops when fewer than min_feats_for_eval letters pass its probe
            out[name] = {k: float("nan") for k in SAEBENCH_KEYS} | {
                "per_letter": {},
                "status": "insufficient",
            }
            continue
        m = r["eval_result_metrics"]["mean"]
        out[name] = {k: m[v] for k, v in SAEBENCH_KEYS.items()} | {
            "per_letter": {
                d["first_letter"]: {
                    "full": d["full_absorption_rate"],
                    "fraction": d["mean_absorption_fraction"],
                }
                for d in r["eval_result_details"]
            },
            "num_split_features": m["mean_num_split_features"],
        }
    run = {"seed": seed, "wall_s": time.time() - start, "saes": out}
    record = {"identity": ident, "run": run, "saebench_output": got}  # SAEBench's own output, kept whole
    (Path(args.out) / f"saebench_seed{seed}.json").write_text(
        json.dumps(record, indent=2, default=str) + "\n"
    )
    return run


def identity(sha: str, saes: list[str]) -> dict:
    """What a seed's result depends on besides the seed: the word sample and the SAEs' weights (by hash, so
    an SAE retrained under the same name is never matched with an old result)."""
    weights = {Path(p).name: hashlib.sha256((Path(p) / WEIGHTS).read_bytes()).hexdigest() for p in saes}
    return {"sample_sha256": sha, "sae_sha256": weights}


def reusable(path: Path, ident: dict) -> dict | None:
    """An earlier seed's saved record (atmpipe's results.json, SAEBench's saebench_seed<N>.json) if it was
    made on the same words and weights."""
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    return saved if saved.get("identity") == ident else None


def welch(a: list[float], b: list[float]) -> dict:
    """mean(a) − mean(b) with its Welch 95% interval (None with fewer than 2 values a side)."""
    import statistics

    from scipy.stats import t as student_t

    diff = statistics.fmean(a) - statistics.fmean(b)
    if len(a) < 2 or len(b) < 2:
        return {"diff": diff, "ci95": None}
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    if va + vb == 0:
        return {"diff": diff, "ci95": [diff, diff]}
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = float(student_t.ppf(0.975, dof)) * (va + vb) ** 0.5
    return {"diff": diff, "ci95": [diff - half, diff + half], "dof": dof}


def agreement(ours: list[float], theirs: list[float]) -> dict:
    """One SAE, one metric: both sides' seeds and the Welch interval of the difference of means; it passes
    when that interval lies inside ± TOLERANCE."""
    w = welch(ours, theirs)
    ok = w["ci95"] is not None and -TOLERANCE <= w["ci95"][0] and w["ci95"][1] <= TOLERANCE
    return {
        "atmpipe_mean": sum(ours) / len(ours),
        "atmpipe_by_seed": ours,
        "saebench_mean": sum(theirs) / len(theirs),
        "saebench_by_seed": theirs,
        **w,
        "pass": ok,
    }


def ranking(rows: dict, names: list[str], metric: str) -> dict:
    """Every pair SAEBench separates beyond its own Welch interval over its seeds must be ordered alike by
    atmpipe's means; pairs it does not separate set no requirement."""
    pairs = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            theirs = welch(rows[a][metric]["saebench_by_seed"], rows[b][metric]["saebench_by_seed"])
            ci = theirs["ci95"]
            if ci is None or ci[0] <= 0 <= ci[1]:
                continue
            ours = rows[a][metric]["atmpipe_mean"] - rows[b][metric]["atmpipe_mean"]
            pairs.append({"pair": [a, b], "saebench": theirs, "atmpipe_diff": ours, "same": (ours > 0) == (ci[0] > 0)})  # fmt: skip
    return {"separated_by_saebench": pairs, "same": all(p["same"] for p in pairs)}


def compare(atm_runs: list[dict], sb_runs: list[dict], names: list[str]) -> dict:
    rows = {}
    for n in names:
        rows[n] = {
            m: agreement(
                [r["results"][n]["absorption"].get(key, float("nan")) for r in atm_runs],
                [r["saes"][n][m] for r in sb_runs],
            )
            for m, key in METRICS.items()
        }
    ranks = {m: ranking(rows, names, m) for m in METRICS}
    ok = all(r[m]["pass"] for r in rows.values() for m in METRICS) and all(r["same"] for r in ranks.values())
    return {"per_sae": rows, "ranking": ranks, "tolerance": TOLERANCE, "pass": ok}


def per_letter_table(atm: dict, sb: dict, names: list[str]) -> list[str]:
    lines = [
        f"| SAE | letter | atmpipe fraction / full (seed {atm['seed']}) | SAEBench (seed {sb['seed']}) |"
    ]
    lines.append("|---|---|---|---|")
    for n in names:
        a = atm["results"][n]["absorption"].get("per_letter", {})
        s = sb["saes"][n]["per_letter"]
        for c in sorted(set(a) | set(s)):
            fa = f"{a[c]['absorption_fraction']:.3f} / {a[c]['full_absorption']:.3f}" if c in a else "—"
            fs = f"{s[c]['fraction']:.3f} / {s[c]['full']:.3f}" if c in s else "—"
            lines.append(f"| {n} | {c} | {fa} | {fs} |")
    return lines


def summary_md(result: dict) -> str:
    cmp, names = result["comparison"], result["saes"]
    lines = [
        "# atmpipe vs SAEBench absorption (crosscheck)",
        "",
        f"Model {result['model']} layer {result['layer']}; word sample {result['sample']}; seeds "
        f"{result['seeds']} on both sides; versions {json.dumps(result['versions'])}.",
        "Wall time: atmpipe "
        + ", ".join(f"{r['wall_s']:.0f} s" for r in result["atmpipe_runs"])
        + "; SAEBench "
        + ", ".join(f"{r['wall_s']:.0f} s" for r in result["saebench_runs"])
        + f"; total {result['total_wall_s']:.0f} s (this run; reused seeds keep their own times).",
        "",
        f"| SAE | metric | atmpipe mean (by seed) | SAEBench mean (by seed) | diff [Welch 95%] | inside ±{cmp['tolerance']:g} |",
        "|---|---|---|---|---|---|",
    ]

    def by_seed(values):
        return ", ".join(f"{v:.3f}" for v in values)

    def interval(r):
        ci = r["ci95"]
        return f"{r['diff']:+.3f} " + (f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "(no interval: < 2 seeds)")

    for n in names:
        for m, r in cmp["per_sae"][n].items():
            lines.append(
                f"| {n} | {m} | {r['atmpipe_mean']:.3f} ({by_seed(r['atmpipe_by_seed'])}) | "
                f"{r['saebench_mean']:.3f} ({by_seed(r['saebench_by_seed'])}) | {interval(r)} | "
                f"{'yes' if r['pass'] else 'NO'} |"
            )
    lines.append("")
    for m, r in cmp["ranking"].items():
        pairs = r["separated_by_saebench"]
        said = "; ".join(
            f"{p['pair'][0]} − {p['pair'][1]}: SAEBench {interval(p['saebench'])}, atmpipe {p['atmpipe_diff']:+.3f}"
            + ("" if p["same"] else " (ORDER DIFFERS)")
            for p in pairs
        )
        lines.append(f"Ranking by {m}: pairs SAEBench separates: {said or 'none'}.")
    lines += [
        "",
        f"**{'PASS' if cmp['pass'] else 'FAIL'}** (every Welch 95% interval inside ±{cmp['tolerance']:g}, and "
        "the same order for every pair SAEBench separates beyond its own interval).",
        "",
    ]
    table = per_letter_table(result["atmpipe_runs"][0], result["saebench_runs"][0], names)
    return "\n".join(lines + table) + "\n"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("saes", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--atmpipe", default=str(ROOT / ".venv" / "bin" / "atmpipe"))
    p.add_argument("--words", type=int, default=1000, help="word sample size (0 = whole vocabulary)")
    p.add_argument("--floor", type=int, default=10, help="per-letter floor on the sample")
    p.add_argument("--min-letters", type=int, default=20, help="letters that must pass the probe gate")
    p.add_argument("--seeds", default="0,1,2,3,4", help="seeds, run on both sides (>= 3 for a Welch interval worth the name)")  # fmt: skip
    p.add_argument("--sample-seed", type=int, default=0, help="the word sample's seed")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="exit 0 when the two sides disagree (the verdict is still written and printed): for make "
        "reproduce, where a disagreement is a finding to report, not a broken stage",
    )
    p.add_argument(
        "--reuse",
        action="store_true",
        help="reuse each seed an earlier run made on the same words and the same SAE weights (by sha256; "
        "DIR/atmpipe/seed*/results.json, DIR/saebench_seed*.json)",
    )
    p.add_argument(
        "--store", help="the SAEs' activation store, where their recorded path does not resolve here"
    )
    args = p.parse_args()
    args.saes = [str(Path(s).resolve()) for s in args.saes]
    args.out = str(Path(args.out).resolve())  # SAEBench runs in a scratch working directory
    return args


def checked_words(model_dir: Path, args) -> list[str]:
    words = word_sample(model_dir, args)
    short = sorted(c for c in LETTERS if sum(w.strip()[0].lower() == c for w in words) < 5)
    if short:  # SAEBench trains its k-sparse probes only for letters in its train split, then reads all 26
        raise SystemExit(
            f"letters {''.join(short)} have < 5 words in the sample: SAEBench fails on a letter "
            "missing from its train split; pass --floor 10"
        )
    return words


def run_seeds(args, out: Path, seeds, words, model, layer, work, ident) -> tuple[list[dict], list[dict]]:
    """Both sides at every seed, each reused where an earlier run made it on the same words and weights."""
    atm_runs, sb_runs = [], []
    for seed in seeds:
        earlier = reusable(out / "atmpipe" / f"seed{seed}" / "results.json", ident) if args.reuse else None
        run = earlier or run_atmpipe(args, out / "atmpipe" / f"seed{seed}", seed, ident)
        if ident["sample_sha256"] != run["shared"]["absorption"]["sample"]["sha256"]:
            raise SystemExit(
                f"atmpipe eval scored another word sample than this script drew (seed {seed}); is the same "
                "code checked out in both venvs?"
            )
        atm_runs.append(run)
    for seed in seeds:
        earlier = reusable(out / f"saebench_seed{seed}.json", ident) if args.reuse else None
        sb_runs.append(
            earlier["run"] if earlier else run_saebench(args, words, HF_NAME[model], layer, seed, work, ident)
        )
    return atm_runs, sb_runs


def rejudge(out: Path) -> bool:
    """Apply the current pass rule to a crosscheck already run (its crosscheck.json), without running either
    side again: `python stages/crosscheck.py rejudge DIR`."""
    result = json.loads((out / "crosscheck.json").read_text())
    result["comparison"] = compare(result["atmpipe_runs"], result["saebench_runs"], result["saes"])
    (out / "crosscheck.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "crosscheck.md").write_text(summary_md(result))
    return result["comparison"]["pass"]


def main() -> int:
    if sys.argv[1:2] == ["rejudge"]:
        return 0 if all([rejudge(Path(d)) for d in sys.argv[2:]]) else 1  # every one, not up to a failure
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = json.loads((Path(args.saes[0]) / "cfg.json").read_text())["metadata"]
    model, layer = meta["model_name"], int(meta["hook_name"].split(".")[1])
    model_dir = Path(os.environ.get("ATMPIPE_HOME", Path.home() / ".cache" / "atmpipe")) / "models" / model
    start = time.time()
    work = Path(tempfile.mkdtemp(prefix="crosscheck-"))
    # Before anything imports huggingface_hub, which reads these once.
    os.environ |= {
        "HF_HOME": str(hf_cache_layout(model_dir, HF_NAME[model], work / "hf")),
        "HF_HUB_OFFLINE": "1",
    }
    words = checked_words(model_dir, args)
    seeds = [int(s) for s in args.seeds.split(",")]
    names = [Path(s).name for s in args.saes]
    ident = identity(hashlib.sha256("\n".join(words).encode()).hexdigest(), args.saes)
    atm_runs, sb_runs = run_seeds(args, out, seeds, words, model, layer, work, ident)
    result = {
        "model": model,
        "layer": layer,
        "saes": names,
        "sample": atm_runs[0]["shared"]["absorption"]["sample"],
        "seeds": seeds,
        "identity": ident,
        "versions": {k: version(k) for k in ("sae-bench", "sae-lens", "transformer-lens", "torch")},
        "atmpipe_runs": [
            {"seed": r["seed"], "command": r["command"], "wall_s": r["wall_s"], "shared": r["shared"]}
            | {"results": {n: r["results"][n] for n in names}}
            for r in atm_runs
        ],
        "saebench_runs": sb_runs,
        "total_wall_s": time.time() - start,
    }
    result["comparison"] = compare(result["atmpipe_runs"], sb_runs, names)
    (out / "crosscheck.json").write_text(json.dumps(result, indent=2) + "\n")
    md = summary_md(result)
    (out / "crosscheck.md").write_text(md)
    print(md)
    shutil.rmtree(work, ignore_errors=True)
    return 0 if result["comparison"]["pass"] or args.report_only else 1


if __name__ == "__main__":
    sys.exit(main())
