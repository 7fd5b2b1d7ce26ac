"""bf16 against fp32 training, paired by method and seed (stages/bf16-quality.sh): the differences with 95%
intervals over the training seeds, and a TOST equivalence test against a margin stated here per metric.

    bf16_quality.py REPORT/results.json OUT_DIR [--runs RUNS_DIR]
    bf16_quality.py --held-out STORE OUT_DIR --runs RUNS_DIR

Writes OUT_DIR/bf16-quality.json and OUT_DIR/bf16-quality.md. SAEs are named <method>-<fp32|bf16>-s<seed>.
--held-out measures without the LM, where `atmpipe eval` cannot run: the core metric's reconstruction
numbers (FVU, L0, dead fraction: `eval.compute.core.reconstruction_metrics` on the store's held-out split) and ATM's
masking diagnostics, for every finished pair in RUNS_DIR (no CE score, no absorption).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
from pathlib import Path

from scipy import stats

# (label, results.json section, key, equivalence margin). The margins say how large a difference would matter
# for the comparison the SAEs are trained for, fixed before the study ran: FVU and CE score 0.01 (an order
# below the gaps between methods), L0 2 of the target's 64, dead fraction 1 point, absorption 0.02 (a tenth
# of the demo's between-method range), ATM's masking diagnostics 0.02 (rates and correlations) and 5% of θ.
METRICS = [
    ("FVU", "core", "fvu", 0.01),
    ("CE score", "core", "ce_loss_score", 0.01),
    ("L0", "core", "l0", 2.0),
    ("dead fraction", "core", "frac_dead", 0.01),
    ("full absorption", "absorption", "mean_full_absorption", 0.02),
    ("absorption fraction", "absorption", "mean_absorption_fraction", 0.02),
    ("ATM θ (relative)", "masking", "theta", 0.05),
    ("ATM mean p", "masking", "mean_p", 0.02),
    ("ATM effective masking rate", "masking", "effective_masking_rate", 0.02),
    ("ATM corr(p, firing)", "masking", "corr_p_firing", 0.02),
]
RELATIVE = {"theta"}  # compared as bf16/fp32 − 1
ALPHA = 0.05
NAME = re.compile(r"(?P<method>[a-z]+)-(?P<precision>fp32|bf16)-s(?P<seed>\d+)")


def value(section: dict | None, key: str) -> float | None:
    if not section or section.get("status") not in (None, "ok"):
        return None
    v = section.get(key)
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def paired(results: dict) -> dict[str, dict[int, dict[str, dict]]]:
    """method → seed → precision → the SAE's results."""
    out: dict = {}
    for name, r in results.items():
        m = NAME.fullmatch(Path(name).name)
        if m:
            out.setdefault(m["method"], {}).setdefault(int(m["seed"]), {})[m["precision"]] = r
    return out


def compare(fp32: list[float], bf16: list[float], margin: float, relative: bool) -> dict:
    """Paired differences (bf16 − fp32, or bf16/fp32 − 1), their mean with a 95% t interval over the seeds,
    and TOST: equivalent when both one-sided tests reject at ALPHA (the 90% interval inside ±margin)."""
    d = [b / a - 1 if relative else b - a for a, b in zip(fp32, bf16, strict=True)]
    n, mean = len(d), statistics.fmean(d)
    sd = statistics.stdev(d) if n > 1 else math.nan
    se = sd / math.sqrt(n)
    row = {"n_seeds": n, "fp32": fp32, "bf16": bf16, "diffs": d, "mean_diff": mean, "margin": margin,
           "fp32_seed_sd": statistics.stdev(fp32) if n > 1 else math.nan}  # fmt: skip
    if n < 2:
        return {**row, "ci95": None, "tost_p": None, "equivalent": None}
    if se == 0:  # identical pairs: equivalent exactly when the mean lies inside the margin
        return {**row, "ci95": [mean, mean], "tost_p": 0.0 if abs(mean) < margin else 1.0,
                "equivalent": abs(mean) < margin}  # fmt: skip
    half = stats.t.ppf(0.975, n - 1) * se
    p_low = stats.t.sf((mean + margin) / se, n - 1)  # H0: diff ≤ −margin
    p_high = stats.t.sf((margin - mean) / se, n - 1)  # H0: diff ≥ +margin
    p = max(p_low, p_high)
    return {**row, "ci95": [mean - half, mean + half], "tost_p": p, "equivalent": bool(p < ALPHA)}


def aggregate(results: dict) -> dict:
    table = {}
    for method, seeds in sorted(paired(results).items()):
        for label, section, key, margin in METRICS:
            pairs = [
                (value(s["fp32"].get(section), key), value(s["bf16"].get(section), key))
                for _, s in sorted(seeds.items())
                if "fp32" in s and "bf16" in s
            ]
            pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
            if pairs:
                fp32, bf16 = (list(x) for x in zip(*pairs, strict=True))
                table.setdefault(method, {})[label] = compare(fp32, bf16, margin, key in RELATIVE)
    return table


def fmt(x: float | None) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.4f}"


def markdown(table: dict, note: str) -> str:
    lines = [note, "", "| method | metric | fp32 mean | bf16 − fp32 (mean) | 95% interval | fp32 seed sd | margin | "
             "TOST p | equal within margin |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for method, rows in table.items():
        for label, r in rows.items():
            ci = "—" if r["ci95"] is None else f"[{fmt(r['ci95'][0])}, {fmt(r['ci95'][1])}]"
            verdict = {True: "yes", False: "not shown", None: "—"}[r["equivalent"]]
            p = "—" if r["tost_p"] is None else f"{r['tost_p']:.3f}"
            lines.append(
                f"| {method} | {label} | {statistics.fmean(r['fp32']):.4f} | {fmt(r['mean_diff'])} | {ci} | "
                f"{r['fp32_seed_sd']:.4f} | ±{r['margin']:g} | {p} | {verdict} |"
            )
    return "\n".join(lines) + "\n"


def describe(runs: Path | None) -> str:
    """What was trained, read from the runs' own configs (not assumed): sizes and the recipe files."""
    configs = sorted(runs.glob("*/train_config.json")) if runs else []
    if not configs:
        return ""
    cfg = json.loads(configs[0].read_text())["config"]
    steps = cfg["tokens"] // cfg["batch_size"]
    return (
        f"bf16 against fp32 training: d_sae {cfg['d_sae']}, {steps} steps of {cfg['batch_size']} tokens "
        f"({cfg['tokens']:,} tokens; recipes train-<method>.toml, {', '.join(Path(r).name for r in cfg['recipe'][1:])}"
        f"{', --tokens ' + str(cfg['tokens']) if 'tokens' in cfg['overrides'] else ''}), on {cfg['store']}: "
        "the demo's scale, not the reproduction's. "
    )


def held_out(store_path: str, runs: Path, core_tokens: int = 8192) -> dict:
    """results.json's shape for every saved SAE in `runs`: core's reconstruction numbers and ATM's masking
    diagnostics, computed from the store alone (the eval's own functions)."""
    import torch

    from atmpipe.eval.compute.core import reconstruction_metrics
    from atmpipe.eval.metrics.core import core_batches
    from atmpipe.eval.metrics.masking import diagnostics, stats_of
    from atmpipe.sae import SAE
    from atmpipe.store import open_store

    store, results = open_store(store_path), {}
    saved = {p.parent.name: p.parent for p in runs.glob("*/atmpipe.json")}
    # Only finished pairs: the fp32 and the bf16 run of one method and seed.
    twin = {"fp32": "bf16", "bf16": "fp32"}
    pairs = [
        n
        for n in saved
        if (m := NAME.fullmatch(n)) and n.replace(m["precision"], twin[m["precision"]]) in saved
    ]
    for run in (saved[n] for n in sorted(pairs)):
        sae = SAE.load(run)
        with torch.no_grad():
            core = reconstruction_metrics(sae, core_batches(store, sae.cfg.layer, core_tokens))
        results[run.name] = {"core": core}
        stats = stats_of(sae)
        if stats is not None:
            results[run.name]["masking"] = diagnostics(stats, sae.cfg.hparams)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", help="results.json of `atmpipe eval`, or with --held-out the store")
    ap.add_argument("out")
    ap.add_argument("--runs", default=None, help="the runs directory (its wall_times.tsv is copied)")
    ap.add_argument("--held-out", action="store_true", help="measure from the store, without the LM")
    args = ap.parse_args()
    if args.held_out:
        results = held_out(args.results, Path(args.runs))
    else:
        results = json.loads(Path(args.results).read_text())["results"]
    table = aggregate(results)
    measured = (
        "Measured on the store's held-out split without the LM (FVU, L0, dead fraction; no CE score, no "
        "absorption). "
        if args.held_out
        else ""
    )
    note = (
        describe(Path(args.runs) if args.runs else None)
        + measured
        + (
            "bf16 EMULATED on a CPU without bf16 units (ATMPIPE_EMULATE_BF16=1: bf16 operands, fp32 accumulation, "
            "bf16 outputs), paired by method and training seed on the same tokens. Intervals carry the training "
            "seeds only (one eval seed). Produced by stages/bf16-quality.sh."
        )
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"note": note, "alpha": ALPHA, "metrics": [m[:3] + (m[3],) for m in METRICS], "table": table}
    if args.runs and (Path(args.runs) / "wall_times.tsv").exists():
        payload["wall_times_tsv"] = (Path(args.runs) / "wall_times.tsv").read_text()
    (out / "bf16-quality.json").write_text(json.dumps(payload, indent=1) + "\n")
    (out / "bf16-quality.md").write_text(markdown(table, note))
    print(markdown(table, note))


if __name__ == "__main__":
    main()
