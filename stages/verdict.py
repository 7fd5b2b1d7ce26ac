"""The comparisons behind the verdict on ATM, from the reproduction's summary (stages/frontier.py): each one a
difference between two series at one L0 level, written to verdict.md and results.json's "comparisons" so
every sentence of the verdict can be checked against a number.

What an interval contains. A series' number at one level is the mean over its training seeds of each SAE's
mean over its eval seeds. Three sources of randomness move it, and each interval names which it carries:
* training seeds: the spread of the per-SAE numbers over training seeds, sd² / n per side (Welch). Each SAE's
  number is already its mean over eval seeds, so this spread also holds the eval seeds' own variation;
* eval seeds (absorption only: the probes' initialisation, the train/test split, the in-context examples;
  the core metrics do not depend on the eval seed): folded in through the term above. An absorption
  interval needs MIN_EVAL_SEEDS eval seeds on every SAE; with fewer, the eval seeds' spread is unmeasured
  and no interval is given ("unavailable: 1 eval seed");
* words (absorption only): the noise of the scored words. Where both sides have per-word results from the
  same evals, a bootstrap *paired* over the shared words (the same resampled words for both SAEs; letters
  fixed, eval seeds resampled independently); otherwise each side's word-bootstrap interval (half-width /
  1.96), in quadrature.
The difference's 95% interval is ± t(0.975, ν) standard errors, ν the Welch–Satterthwaite degrees of freedom
of the training-seed term. No borrowing: a level with one training seed on either side gets no interval
(and says so); a seed spread measured at one L0 level or training length is never applied at another.

Wording. *Separated*: the 95% interval excludes 0. *Equivalent*: two one-sided tests (TOST, 5% each) put the
difference inside ± the metric's stated margin (MARGINS). Anything else is "not separated; the smallest
difference this run could detect is X", X = (t(0.975, ν) + t(0.80, ν)) standard errors: the difference a
two-sided 5% test would find with 80% power.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import t as student_t

METRICS = {  # metric → how the verdict names it (all four are compared everywhere)
    "absorption.mean_absorption_fraction": "absorption fraction",
    "absorption.mean_full_absorption": "full absorption",
    "core.fvu": "FVU",
    "core.ce_loss_score": "CE loss score",
}
# The equivalence margins: a difference inside ± this is negligible for the verdict. Absorption's is the
# crosscheck's tolerance (stages/crosscheck.py); FVU's and CE score's are a hundredth of their range.
MARGINS = {
    "absorption.mean_absorption_fraction": 0.05,
    "absorption.mean_full_absorption": 0.05,
    "core.fvu": 0.01,
    "core.ce_loss_score": 0.01,
}
EVAL_SEEDED = {"absorption.mean_absorption_fraction", "absorption.mean_full_absorption"}
WORD_KEYS = {"absorption.mean_absorption_fraction": "word_fraction", "absorption.mean_full_absorption": "word_full"}  # fmt: skip
MIN_EVAL_SEEDS = 3
OTHERS = ["topk", "jumprelu", "relu"]
CONTROLS = ["atm-uniform", "atm-log", "atm-r0.5"]
Z95 = 1.96
BOOTSTRAP = 1000


def estimate(summary: dict, series: str, level: str, metric: str) -> dict | None:
    """One series' mean at one level, its training-seed sd, eval seeds and word-sampling standard error;
    None where it was not measured."""
    cell = summary.get(series, {}).get(level)
    m = None if cell is None else cell["metrics"].get(metric)
    if m is None:
        return None
    ci = cell["ci95"].get(metric)
    return {
        "mean": m["mean"],
        "n": m["n"],
        "sd": m["sd"],
        "eval_seeds": cell.get("eval_seeds", {}).get(metric, 1) if metric in EVAL_SEEDED else None,
        "eval_sd": cell.get("eval_sd", {}).get(metric),
        "words_se": (ci[1] - ci[0]) / 2 / Z95 if ci else 0.0,
        "runs": cell.get("runs", []),
    }


def no_interval(a: dict, b: dict, names: tuple[str, str], metric: str) -> str | None:
    """Why a difference gets no interval, or None when it gets one."""
    for e, name in zip((a, b), names, strict=True):
        if e["n"] < 2:
            return f"unavailable: {name} has 1 training seed here (no seed spread is borrowed)"
    if metric in EVAL_SEEDED:
        for e, name in zip((a, b), names, strict=True):
            if e["eval_seeds"] < MIN_EVAL_SEEDS:
                return (
                    f"unavailable: {name} has {e['eval_seeds']} eval seed(s), {MIN_EVAL_SEEDS} needed "
                    "(the probes' randomness is unmeasured)"
                )
    return None


def paired_words_se(a_runs: list[dict], b_runs: list[dict], key: str, n: int = BOOTSTRAP, seed: int = 0):
    """Standard error, from word sampling alone, of mean(A) − mean(B) where each side's number is its mean
    over SAEs and eval seeds of the mean over letters of the mean over scored words. `a_runs`/`b_runs`:
    per SAE, {eval seed: {letter: {"words": [...], key: [...]}}}. Every replicate draws one resample of each
    letter's words per eval seed and applies it to every SAE of that eval (paired). None when the two sides
    do not share their evals' words (then the caller falls back to unpaired intervals)."""
    if not a_runs or not b_runs:
        return None
    seeds = set.intersection(*(set(r) for r in a_runs + b_runs))
    if not seeds or any(set(r) != seeds for r in a_runs + b_runs):
        return None
    rng = np.random.default_rng(seed)
    diffs = np.zeros(n)
    for e in sorted(seeds):
        letters = a_runs[0][e].keys()
        if any(r[e].keys() != letters or any(r[e][c]["words"] != a_runs[0][e][c]["words"] for c in letters) for r in a_runs + b_runs):  # fmt: skip
            return None
        for c in letters:
            m = len(a_runs[0][e][c]["words"])
            idx = rng.integers(0, m, (n, m))
            for runs, sign in ((a_runs, 1.0), (b_runs, -1.0)):
                for r in runs:
                    values = np.asarray(r[e][c][key], dtype=float)
                    diffs += sign * values[idx].mean(1) / (len(runs) * len(seeds) * len(letters))
    return float(diffs.std(ddof=1))


def difference(a: dict, b: dict, metric: str, names=("A", "B"), words_se: float | None = None) -> dict:
    """a − b: its 95% interval, separation, TOST equivalence within MARGINS[metric] and the smallest
    difference this run could detect; `words_se`: the paired bootstrap's word term, where there is one."""
    diff, margin = a["mean"] - b["mean"], MARGINS[metric]
    out = {"diff": diff, "margin": margin}
    reason = no_interval(a, b, names, metric)
    if reason:
        return out | {"se": None, "ci95": None, "separated": None, "equivalent": None, "interval": reason,
                      "words": None, "summary": f"{diff:+.3f}: no interval"}  # fmt: skip
    va, vb = a["sd"] ** 2 / a["n"], b["sd"] ** 2 / b["n"]
    paired = words_se is not None
    words = words_se if paired else math.hypot(a["words_se"], b["words_se"])
    se = math.sqrt(va + vb + words**2)
    # Welch–Satterthwaite over the training-seed terms; the word term has (nearly) unlimited dof
    dof = se**4 / (va**2 / (a["n"] - 1) + vb**2 / (b["n"] - 1)) if va + vb > 0 else math.inf
    half = float(student_t.ppf(0.975, dof)) * se
    low, high = diff - half, diff + half
    separated = low > 0 or high < 0
    tost_p = tost(diff, se, dof, margin)
    detectable = float(student_t.ppf(0.975, dof) + student_t.ppf(0.80, dof)) * se
    out |= {
        "se": se,
        "dof": dof if math.isfinite(dof) else None,
        "ci95": [low, high],
        "separated": separated,
        "tost_p": tost_p,
        "equivalent": tost_p < 0.05,
        "detectable": detectable,
        "words": None
        if metric not in EVAL_SEEDED
        else "paired bootstrap over shared words"
        if paired
        else "each side's word-bootstrap CI",  # fmt: skip
        "interval": "training seeds, eval seeds folded in, + words"
        if metric in EVAL_SEEDED
        else "training seeds",
    }
    return out | {"summary": wording(out)}


def tost(diff: float, se: float, dof: float, margin: float) -> float:
    """Two one-sided tests of |diff| < margin: the larger of the two one-sided p-values."""
    if se == 0:
        return 0.0 if abs(diff) < margin else 1.0
    return float(max(student_t.sf((diff + margin) / se, dof), student_t.cdf((diff - margin) / se, dof)))


def wording(r: dict) -> str:
    """What a sentence may say about a difference."""
    interval = f"{r['diff']:+.3f} [{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}]"
    if r["separated"]:
        return f"{interval}: separated"
    if r["equivalent"]:
        return f"{interval}: equivalent within ±{r['margin']:g} (TOST p = {r['tost_p']:.3f})"
    return (
        f"{interval}: not separated; the smallest difference this run could detect is {r['detectable']:.3f}"
    )


def compare(
    summary: dict, a: str, b: str, level: str, question: str, words: dict | None = None
) -> list[dict]:
    rows = []
    for metric in METRICS:
        ea, eb = (estimate(summary, s, level, metric) for s in (a, b))
        if not (ea and eb):
            continue
        wse = None
        if words is not None and metric in WORD_KEYS:
            sides = [[words[n] for n in e["runs"] if n in words] for e in (ea, eb)]
            if all(len(s) == len(e["runs"]) for s, e in zip(sides, (ea, eb), strict=True)):
                wse = paired_words_se(*sides, WORD_KEYS[metric])
        row = {"question": question, "l0": int(level), "a": a, "b": b, "metric": metric}
        rows.append(row | {a: _public(ea), b: _public(eb)} | difference(ea, eb, metric, (a, b), wse))
    return rows


def _public(e: dict) -> dict:
    return {k: v for k, v in e.items() if k != "runs"}


def gap_change(summary: dict, head: str, times: int) -> list[dict]:
    """How ATM's distance to TopK at the head level moves with `times`× the tokens: (atm − topk) at ×times
    minus (atm − topk) at ×1, per metric; no interval unless all four cells have training seeds."""
    rows = []
    for metric in METRICS:
        cells = [
            estimate(summary, s, head, metric) for s in ("atm", "topk", f"atm-x{times}", f"topk-x{times}")
        ]
        if not all(cells):
            continue
        once = cells[0]["mean"] - cells[1]["mean"]
        longer = cells[2]["mean"] - cells[3]["mean"]
        row = {"question": f"ATM − TopK gap, ×{times} tokens minus ×1", "l0": int(head), "metric": metric,
               "gap_x1": once, "gap_longer": longer}  # fmt: skip
        single = [s for s, c in zip(("atm", "topk", f"atm-x{times}", f"topk-x{times}"), cells, strict=True) if c["n"] < 2]  # fmt: skip
        if single:
            reason = f"unavailable: {', '.join(single)} with 1 training seed (no seed spread is borrowed)"
            rows.append(row | {"diff": longer - once, "ci95": None, "separated": None, "interval": reason,
                               "summary": f"{longer - once:+.3f}: no interval"})  # fmt: skip
            continue
        a = {"mean": longer, "n": min(cells[2]["n"], cells[3]["n"]), "eval_seeds": min(c["eval_seeds"] or 99 for c in cells[2:]),
             "sd": math.hypot(cells[2]["sd"], cells[3]["sd"]), "words_se": math.hypot(cells[2]["words_se"], cells[3]["words_se"])}  # fmt: skip
        b = {"mean": once, "n": min(cells[0]["n"], cells[1]["n"]), "eval_seeds": min(c["eval_seeds"] or 99 for c in cells[:2]),
             "sd": math.hypot(cells[0]["sd"], cells[1]["sd"]), "words_se": math.hypot(cells[0]["words_se"], cells[1]["words_se"])}  # fmt: skip
        rows.append(row | difference(a, b, metric, (f"×{times}", "×1")))
    return rows


def comparisons(
    summary: dict, head: int, words: dict | None = None, suffix: str = "", others: list[str] | None = None
) -> list[dict]:
    """Every comparison the verdict needs that the summary can answer (missing series are skipped);
    `words`: per run, its per-word absorption results by eval seed (frontier.word_scores), for pairing;
    `suffix`: the training length the verdict is stated at ("-x16": every series at 16× the tokens);
    `others`: the methods ATM is compared with (default OTHERS; stages/frontier.py passes every registered one)."""
    h = str(head)
    rows = []
    levels = sorted(summary.get(f"atm{suffix}", {}), key=int)
    for level in levels:
        for other in others or OTHERS:
            rows += compare(summary, f"atm{suffix}", f"{other}{suffix}", level, "ATM against each method at matched L0", words)  # fmt: skip
    for control in CONTROLS:
        rows += compare(summary, f"{control}{suffix}", f"atm{suffix}", h, "ATM's masking controls against ATM", words)  # fmt: skip
    # ATM is ReLU + L1 with masking on top: each control against that base says what masking alone buys
    for control in CONTROLS:
        rows += compare(summary, f"{control}{suffix}", f"relu{suffix}", h, "ATM's masking controls against ReLU + L1", words)  # fmt: skip
    if suffix:  # the training-length axis is stages/convergence.py's
        return rows
    for times in sorted({int(s.rsplit("-x", 1)[1]) for s in summary if "-x" in s}):
        rows += compare(summary, f"atm-x{times}", "atm", h, f"ATM at ×{times} tokens against ×1", words)
        rows += gap_change(summary, h, times)
    return rows


def _cell(e: dict) -> str:
    seeds = f"{e['n']} training seed{'s' if e['n'] > 1 else ''}"
    if e.get("eval_seeds") is not None:
        seeds += f" × {e['eval_seeds']} eval seed{'s' if e['eval_seeds'] > 1 else ''}"
    return f"{e['mean']:.3f} ({seeds})"


def markdown(rows: list[dict]) -> str:
    """One table per question: each side's mean and what it rests on, the difference with its interval and
    the sentence it allows."""
    margins = ", ".join(f"{METRICS[m]} ±{v:g}" for m, v in MARGINS.items())
    lines = [
        "# The verdict's numbers (generated by stages/verdict.py from results.json's summary)",
        "",
        "Each side: mean over training seeds of each SAE's mean over its eval seeds. Each difference: 95% "
        "interval from the training seeds' spread (Welch; it holds the eval seeds' spread, since each SAE's "
        "number is its mean over eval seeds) and, for absorption, the word sampling (a bootstrap paired over "
        "the shared words where per-word results exist, else each side's word-bootstrap CI). No interval "
        f"where a side has one training seed, or, for absorption, fewer than {MIN_EVAL_SEEDS} eval seeds. "
        f"Equivalence: TOST at 5% within the margins {margins}. Otherwise: not separated, with the smallest "
        "difference the run could detect (80% power). A comparison whose sides ran at different code versions says so "
        "(results.json: same_code; null where the versions were not recorded).",
    ]
    question = None
    for r in rows:
        if r["question"] != question:
            question = r["question"]
            lines += ["", f"## {question}", ""]
            lines += ["| L0 | metric | A | B | A − B [95%] and what it allows | interval carries |", "|---|---|---|---|---|---|"]  # fmt: skip
        if "a" in r:
            cells = f"{r['a']} {_cell(r[r['a']])} | {r['b']} {_cell(r[r['b']])}"
        else:
            cells = f"gap ×1 {r['gap_x1']:+.3f} | gap longer {r['gap_longer']:+.3f}"
        carries = r["interval"] + (f" ({r['words']})" if r.get("words") else "")
        if r.get("same_code") is False:
            carries += "; **the two sides ran at different code**"
        lines.append(f"| {r['l0']} | {METRICS[r['metric']]} | {cells} | {r['summary']} | {carries} |")
    return "\n".join(lines) + "\n"
