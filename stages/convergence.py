"""The training-length axis of `make reproduce`'s convergence part (stages/converge.sh): every method at L0 64
at 1×, 4× and 16× the 2^21-token base (2M, 8M, 32M tokens), from the aggregate's summary (stages/frontier.py).

Converged, per method and metric: the change from the second-longest to the longest length (8M → 32M) lies
within its uncertainty, i.e. its 95% interval (stages/verdict.py: Welch over training seeds, eval seeds folded
in, words paired where possible) contains 0. Where it does not, the method is still moving and is never
quoted as converged; where the interval is unavailable (a length with one training seed, or absorption with
fewer than 3 eval seeds) the status is "undetermined", never "converged". Equivalence within the metric's
margin (TOST) is reported beside it: an interval that contains 0 only because it is wide is not the same as a
change shown to be small. Written to convergence.json and convergence.md, and one figure per metric against
tokens (convergence_<metric>.png).
"""

from __future__ import annotations

import json
from pathlib import Path

import frontier
import matplotlib.pyplot as plt
import verdict
from scipy.stats import t as student_t

from atmpipe.eval.report import FIG_SIZE

BASE_TOKENS = 2_097_152  # stages/reproduce-train.toml's tokens: the ×1 of the run names


def lengths(summary: dict, method: str, level: str) -> dict[int, str]:
    """{token multiple: series} of one method measured at `level` (atm → 1, atm-x4 → 4, ...)."""
    found = {}
    for series, cells in summary.items():
        base, _, times = series.partition("-x")
        if base == method and level in cells:
            found[int(times or 1)] = series
    return dict(sorted(found.items()))


def status(change: dict) -> str:
    if change["ci95"] is None:
        return "undetermined"
    return "still moving" if change["separated"] else "converged"


def passes(summary: dict, series: str, level: str, runs: dict | None) -> float | None:
    """Passes over the store a length's SAEs made (their `epochs`): 2M tokens are unique on the fresh store,
    8M and 32M repeat it. None where the runs' metadata is not at hand."""
    found = [runs[n]["epochs"] for n in summary[series][level].get("runs", []) if n in (runs or {}) and "epochs" in runs[n]]  # fmt: skip
    return sum(found) / len(found) if found else None


def axis(
    summary: dict, methods: list[str], level: str, words: dict | None = None, runs: dict | None = None
) -> dict:
    """Per method and metric: each length's mean with its 95% half-width (None with one training seed) and its
    passes over the store, and the change between the two longest lengths with its interval and status."""
    out: dict = {}
    for method in methods:
        series = lengths(summary, method, level)
        if len(series) < 2:
            continue
        for metric in verdict.METRICS:
            points = []
            for times, s in series.items():
                e = verdict.estimate(summary, s, level, metric)
                if e is None:
                    continue
                half = None
                if e["n"] > 1:
                    half = float(student_t.ppf(0.975, e["n"] - 1)) * e["sd"] / e["n"] ** 0.5
                points.append({"tokens": BASE_TOKENS * times, "series": s, "mean": e["mean"], "n": e["n"],
                               "eval_seeds": e["eval_seeds"], "half_width_95": half,
                               "passes": passes(summary, s, level, runs)})  # fmt: skip
            if len(points) < 2:
                continue
            (last, a), (prev, b) = list(series.items())[-1], list(series.items())[-2]
            change = verdict.compare(summary, a, b, level, "change", words)
            change = next((r for r in change if r["metric"] == metric), None)
            if change is None:
                continue
            keep = ("diff", "ci95", "separated", "equivalent", "tost_p", "detectable", "interval", "summary")
            out.setdefault(method, {})[metric] = {
                "points": points,
                "change": {"from_tokens": BASE_TOKENS * prev, "to_tokens": BASE_TOKENS * last}
                | {k: change.get(k) for k in keep},
                "status": status(change),
            }
    return out


def figure(result: dict, metric: str, path: Path) -> bool:
    """One metric against training tokens, a line per method; error bars: the 95% half-width over training
    seeds where a length has seeds (none drawn for a single seed)."""
    fig, ax = plt.subplots(figsize=FIG_SIZE)
    drawn = False
    for method, metrics in result.items():
        if metric not in metrics:
            continue
        pts = metrics[metric]["points"]
        ax.errorbar([p["tokens"] for p in pts], [p["mean"] for p in pts],
                    yerr=[p["half_width_95"] or 0 for p in pts], marker="o", capsize=4,
                    label=f"{method} ({metrics[metric]['status']})")  # fmt: skip
        drawn = True
    if drawn:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("training tokens")
        ax.set_ylabel(verdict.METRICS[metric])
        ax.set_title(f"{verdict.METRICS[metric]} against training tokens at L0 {frontier.HEAD_L0}\n"
                     "(error bars: 95% interval over training seeds, where there are seeds)", fontsize=10)  # fmt: skip
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        frontier._save(fig, path)
    else:
        plt.close(fig)
    return drawn


def markdown(result: dict) -> str:
    lines = [
        "# Convergence (generated by stages/convergence.py)",
        "",
        "Converged: the change from the second-longest to the longest length has a 95% interval that contains "
        "0; still moving: it excludes 0; undetermined: no interval (a length with one training seed, or "
        "absorption with fewer than 3 eval seeds).",
        "",
        "| method | metric | by tokens (mean, n seeds, passes over the store) | change [95%] and what it allows | status |",
        "|---|---|---|---|---|",
    ]
    for method, metrics in result.items():
        for metric, r in metrics.items():
            pts = ", ".join(
                f"{p['tokens'] / 2**20:g}M {p['mean']:.3f} ({p['n']}"
                + (f", {p['passes']:.2g} passes)" if p.get("passes") else ")")
                for p in r["points"]
            )
            lines.append(f"| {method} | {verdict.METRICS[metric]} | {pts} | {r['change']['summary']} | {r['status']} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def write(results_dir: Path, level: int = frontier.HEAD_L0) -> dict:
    """convergence.json, convergence.md and the figures from RESULTS_DIR's aggregate (frontier.write first)."""
    payload = json.loads((results_dir / "results.json").read_text())
    summary = payload["summary"]
    result = axis(
        summary, frontier.METHODS, str(level), frontier.word_scores(results_dir), payload.get("runs")
    )
    figures = {}
    for metric in verdict.METRICS:
        file = f"convergence_{metric.split('.')[-1]}.png"
        figures[file] = figure(result, metric, results_dir / file)
    payload = {"level": level, "base_tokens": BASE_TOKENS, "methods": result,
               "figures": sorted(f for f, drawn in figures.items() if drawn)}  # fmt: skip
    (results_dir / "convergence.json").write_text(json.dumps(payload, indent=2) + "\n")
    (results_dir / "convergence.md").write_text(markdown(result))
    return payload
