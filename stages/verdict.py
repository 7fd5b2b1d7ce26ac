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

The paper's claims 3-5 (`claims`) are read from the probing, SCR and TPP sections at the head level, with the
same construction: the training seeds' spread (Welch) plus, in quadrature, each side's own sampling interval
(probing: a bootstrap over test examples and the spread over 3 probe seeds; SCR and TPP: a bootstrap over test
examples; half-width / 1.96 each). The test examples are shared by all SAEs of an eval, so treating the two
sides' sampling as independent is conservative. The paper's numbers enter as constants (no interval). SCR or
TPP whose minimum detectable difference at 95% (√2 × its half-width, per SAE) exceeds MDD_LIMIT on either side
is not compared: the verdict says the data cannot resolve it, and prints no difference.

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
# The paper's claims 3-5: the metrics each is read from, and their margins (accuracy: a hundredth; SCR and
# TPP: the half-width issue 27 asks of them).
PROBING = {"probing.mean_sae_top_1": "mean probing accuracy, k = 1", "probing.mean_sae_top_5": "mean probing accuracy, k = 5"}  # fmt: skip
SENTIMENT = {"probing.sentiment_sae_top_1": "sentiment accuracy, k = 1", "probing.sentiment_sae_top_5": "sentiment accuracy, k = 5"}  # fmt: skip
BIAS = {"bias.scr_headline": "SCR at N = 20", "tpp.tpp_headline": "TPP at N = 20"}
NAMES = METRICS | PROBING | SENTIMENT | BIAS
MARGINS |= dict.fromkeys([*PROBING, *SENTIMENT], 0.01) | dict.fromkeys(BIAS, 0.05)
# What each side's own sampling interval carries, where it has one
SAMPLED = dict.fromkeys([*PROBING, *SENTIMENT], "test-example bootstrap + probe seeds") | dict.fromkeys(BIAS, "test-example bootstrap")  # fmt: skip
MDD_LIMIT = 0.1  # SCR or TPP that cannot tell 0.1 apart is dropped, not printed
PAPER_CLAIMS = {"probing": 0.7161, "sentiment": 0.853, "bias": 0.796}  # ATM's, as in Metric.paper
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
        else f"training seeds + {SAMPLED[metric]} (each side's interval)"
        if metric in SAMPLED
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
    summary: dict, a: str, b: str, level: str, question: str, words: dict | None = None, metrics=METRICS
) -> list[dict]:
    rows = []
    for metric in metrics:
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
            rows += compare(summary, f"atm{suffix}", f"{other}{suffix}", level, question_for(other), words)
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


def question_for(other: str) -> str:
    """Matryoshka, the field's own fix for absorption, is its own question; the paper's baselines share one."""
    if other == "matryoshka":
        return "ATM against Matryoshka (BatchTopK with nested prefixes) at matched L0"
    return "ATM against each method at matched L0"


def _cell(e: dict) -> str:
    seeds = f"{e['n']} training seed{'s' if e['n'] > 1 else ''}"
    if e.get("eval_seeds") is not None:
        seeds += f" × {e['eval_seeds']} eval seed{'s' if e['eval_seeds'] > 1 else ''}"
    return f"{e['mean']:.3f} ({seeds})"


def markdown(rows: list[dict], claimed: dict | None = None) -> str:
    """One table per question: each side's mean and what it rests on, the difference with its interval and
    the sentence it allows; then, given `claimed` (claims()), the paper's claims 3-5 one by one."""
    margins = ", ".join(f"{NAMES[m]} ±{v:g}" for m, v in MARGINS.items())
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
            lines += ROWS_HEADER
        lines.append(row_line(r))
    if claimed:
        lines += claims_markdown(claimed)
    return "\n".join(lines) + "\n"


ROWS_HEADER = ["| L0 | metric | A | B | A − B [95%] and what it allows | interval carries |", "|---|---|---|---|---|---|"]  # fmt: skip


def row_line(r: dict) -> str:
    """One comparison as a table row."""
    if "a" in r:
        cells = f"{r['a']} {_cell(r[r['a']])} | {r['b']} {_cell(r[r['b']])}"
    else:
        cells = f"gap ×1 {r['gap_x1']:+.3f} | gap longer {r['gap_longer']:+.3f}"
    carries = r["interval"] + (f" ({r['words']})" if r.get("words") else "")
    if r.get("same_code") is False:
        carries += "; **the two sides ran at different code**"
    return f"| {r['l0']} | {NAMES[r['metric']]} | {cells} | {r['summary']} | {carries} |"


# --- the paper's claims 3-5 -----------------------------------------------------------------------

QUESTIONS = {
    "probing": 'Claim 3, "ATM outperforms other methods in sparse probing": ATM against each method',
    "sentiment": 'Claim 4, "sentiment 0.853": each method against the paper\'s number',
    "bias": 'Claim 5, "superior bias detection": ATM against each method',
}
PAPER_SIDE = "the paper's number (a constant)"


def claims(summary: dict, head: int, others: list[str], suffix: str = "") -> dict:
    """The paper's claims 3-5, each answered at the head level from the summary (module docstring): the
    comparisons, the figures they rest on and one answer per claim; "not measured" where a section is absent."""
    h, atm = str(head), f"atm{suffix}"
    series = [f"{o}{suffix}" for o in others if h in summary.get(f"{o}{suffix}", {})]
    return {
        "l0": head,
        "probing": probing_claim(summary, h, atm, series),
        "sentiment": sentiment_claim(summary, h, [atm, *series]),
        "bias": bias_claim(summary, h, atm, series),
    }


def probing_claim(summary: dict, h: str, atm: str, others: list[str]) -> dict:
    """ATM against each method on mean probing accuracy (k = 1, 5), and each method's share of tasks whose
    probe beats the residual baseline with as many dimensions (mean over training seeds)."""
    q = QUESTIONS["probing"]
    rows = [r for o in others for r in compare(summary, atm, o, h, q, metrics=PROBING)]
    shares = {}
    for s in [atm, *others]:
        cell = summary.get(s, {}).get(h) or {"metrics": {}}
        got = {f"k{k}{sep}": cell["metrics"].get(f"probing.share_beats_resid_top_{k}{sep}") for k in (1, 5) for sep in ("", "_separated")}  # fmt: skip
        if any(v is not None for v in got.values()):
            seeds = max(v["n"] for v in got.values() if v)
            shares[s] = {k: v and v["mean"] for k, v in got.items()} | {"training_seeds": seeds}
    return {"claim": q, "paper": PAPER_CLAIMS["probing"], "rows": rows, "beats_residual": shares,
            "answer": answer(rows, PROBING)}  # fmt: skip


def sentiment_claim(summary: dict, h: str, series: list[str]) -> dict:
    """Each method's sentiment group mean (k = 1, 5) with its interval, against the paper's 0.853 for ATM."""
    paper = PAPER_CLAIMS["sentiment"]
    constant = {"mean": paper, "n": 2, "sd": 0.0, "eval_seeds": None, "words_se": 0.0}  # no spread
    rows = []
    for s in series:
        for metric in SENTIMENT:
            e = estimate(summary, s, h, metric)
            if e is None:
                continue
            d = difference(e, constant, metric, (s, PAPER_SIDE))
            ci = d["ci95"] and [d["ci95"][0] + paper, d["ci95"][1] + paper]
            rows.append({"question": QUESTIONS["sentiment"], "l0": int(h), "series": s, "metric": metric,
                         s: _public(e), "paper": paper, "value_ci95": ci} | d)  # fmt: skip
    atm_rows = [r for r in rows if r["series"] == series[0]]
    if not atm_rows:
        return {"claim": QUESTIONS["sentiment"], "paper": paper, "rows": rows, "answer": "not measured"}
    said = "; ".join(f"{NAMES[r['metric']]} {_valued(r)}" for r in atm_rows)
    note = ("on this model and the sae-probes sentiment sets, not the paper's Gemma-2-2b and SAEBench's sets: "
            "the difference says how far this setting lies from the paper's number")  # fmt: skip
    return {"claim": QUESTIONS["sentiment"], "paper": paper, "rows": rows, "answer": f"ATM's {said} ({note})"}


def _valued(r: dict) -> str:
    """'0.812 [0.80, 0.82]: below the paper's 0.853 (separated)' and the like."""
    value = f"{r['diff'] + r['paper']:.3f}"
    if r["ci95"] is None:
        return f"{value} ({r['interval']})"
    value += f" [{r['value_ci95'][0]:.3f}, {r['value_ci95'][1]:.3f}]"
    if r["separated"]:
        side = "above" if r["diff"] > 0 else "below"
        return f"{value}: {side} the paper's {r['paper']:g} (separated)"
    if r["equivalent"]:
        return f"{value}: equal to the paper's {r['paper']:g} (TOST within ±{r['margin']:g})"
    return f"{value}: not separated from the paper's {r['paper']:g}"


BIAS_FIGURES = ("n_test", "n_pairs", "n_sets", "a_base", "a_oracle", "mdd_headline", "half_width_headline")


def bias_claim(summary: dict, h: str, atm: str, others: list[str]) -> dict:
    """SCR and TPP: per method the figures that say what the data can resolve (n, A_base, A_oracle, MDD at
    95%); a score any of whose SAEs has MDD above MDD_LIMIT is dropped with that reason, else ATM against
    each method."""
    out = {"claim": QUESTIONS["bias"], "paper": PAPER_CLAIMS["bias"]}
    for metric, name in BIAS.items():
        section = metric.split(".")[0]
        info = {}
        for s in [atm, *others]:
            m = (summary.get(s, {}).get(h) or {"metrics": {}})["metrics"]
            got = {k: m[f"{section}.{k}"] for k in BIAS_FIGURES if f"{section}.{k}" in m}
            if got:
                info[s] = {k: v["mean"] for k, v in got.items()} | {
                    "score": m[metric]["mean"] if metric in m else None
                }
                info[s]["mdd_max"] = max(got["mdd_headline"]["values"]) if "mdd_headline" in got else None
        mdds = [v["mdd_max"] for v in info.values() if v["mdd_max"] is not None]
        mdd = max(mdds) if mdds else None
        if not info:
            out[section] = {"answer": "not measured"}
        elif mdd is None or mdd > MDD_LIMIT or any(v["score"] is None for v in info.values()):
            shown = "unknown" if mdd is None else f"{mdd:.2f}"
            out[section] = {"per_series": info, "resolved": False, "mdd": mdd, "answer": (
                f"{name} cannot resolve a difference of {MDD_LIMIT:g} on this data (largest minimum detectable "
                f"difference at 95% over the SAEs: {shown}); dropped from the verdict, no difference printed")}  # fmt: skip
        else:
            rows = [r for o in others for r in compare(summary, atm, o, h, QUESTIONS["bias"], metrics={metric: name})]  # fmt: skip
            out[section] = {"per_series": info, "resolved": True, "mdd": mdd, "rows": rows,
                            "answer": answer(rows, {metric: name})}  # fmt: skip
    out["answer"] = f"SCR: {out['bias']['answer']}; TPP: {out['tpp']['answer']}"
    return out


def answer(rows: list[dict], metrics: dict) -> str:
    """The overall word, then per metric where each method stands: "supported" where ATM is above every other
    method (separated) on every metric, "contradicted" where it is below one (separated), else "undecided"."""
    if not rows:
        return "not measured"
    parts, verdicts = [], []
    for metric, name in metrics.items():
        mine = [r for r in rows if r["metric"] == metric]
        if not mine:
            continue
        groups = {
            "above (separated)": [r["b"] for r in mine if r["separated"] and r["diff"] > 0],
            "below (separated)": [r["b"] for r in mine if r["separated"] and r["diff"] < 0],
            "equal (TOST within margin)": [r["b"] for r in mine if r["equivalent"]],
            "not separated from": [r["b"] for r in mine if r["separated"] is False and not r["equivalent"]],
            "no interval against": [r["b"] for r in mine if r["separated"] is None],
        }
        below, above = groups["below (separated)"], groups["above (separated)"]
        verdicts.append("contradicted" if below else "supported" if len(above) == len(mine) else "undecided")
        parts.append(f"{name}: " + "; ".join(f"{k} {', '.join(v)}" for k, v in groups.items() if v))
    overall = "contradicted" if "contradicted" in verdicts else "supported" if set(verdicts) == {"supported"} else "undecided"  # fmt: skip
    return f"{overall} — " + " · ".join(parts)


def claims_markdown(c: dict) -> list[str]:
    """The claims section of verdict.md: each claim, its answer, and the table it rests on."""
    lines = ["", f"# The paper's claims 3-5, at L0 {c['l0']}", ""]
    p = c["probing"]
    lines += [f"## {p['claim']} (paper: ATM {p['paper']:g} on Gemma-2-2b)", "", f"**{p['answer']}**", ""]
    if p["rows"]:
        lines += [*ROWS_HEADER, *(row_line(r) for r in p["rows"]), ""]
    if p["beats_residual"]:
        lines += ["Share of tasks where the SAE's top-k probe beats the top-k residual dimensions (mean over "
                  "training seeds; in brackets: with the paired difference's 95% interval above 0):", "",
                  "| series | k = 1 | k = 5 | training seeds |", "|---|---|---|---|"]  # fmt: skip
        for s, v in p["beats_residual"].items():
            cells = [f"{v[f'k{k}']:.2f} ({v[f'k{k}_separated']:.2f})" if v[f"k{k}"] is not None else "—" for k in (1, 5)]  # fmt: skip
            lines.append(f"| {s} | {' | '.join(cells)} | {v['training_seeds']} |")
        lines.append("")
    s = c["sentiment"]
    lines += [f"## {s['claim']}", "", f"**{s['answer']}**", ""]
    if s["rows"]:
        lines += ["| series | metric | value [95%] | − paper [95%] and what it allows | interval carries |", "|---|---|---|---|---|"]  # fmt: skip
        for r in s["rows"]:
            value = f"{r['diff'] + r['paper']:.3f}" + (f" [{r['value_ci95'][0]:.3f}, {r['value_ci95'][1]:.3f}]" if r["value_ci95"] else "")  # fmt: skip
            lines.append(
                f"| {r['series']} | {NAMES[r['metric']]} | {value} | {r['summary']} | {r['interval']} |"
            )
        lines.append("")
    b = c["bias"]
    lines += [f"## {b['claim']} (paper: ATM {b['paper']:g}, SAEBench's SCR on Bias in Bios)", ""]
    for section, label in (("bias", "SCR"), ("tpp", "TPP")):
        got = b[section]
        lines += [f"**{label}: {got['answer']}**", ""]
        if got.get("per_series"):
            lines += bias_table(got["per_series"])
        if got.get("rows"):
            lines += [*ROWS_HEADER, *(row_line(r) for r in got["rows"]), ""]
    return lines


FIGURE_LABELS = {"n_test": "n test", "n_pairs": "pairs", "n_sets": "sets", "a_base": "A_base", "a_oracle": "A_oracle",
                 "mdd_max": "MDD at 95% (largest SAE)"}  # fmt: skip


def bias_table(per_series: dict) -> list[str]:
    """n, A_base, A_oracle and MDD per series, the columns the data has (SCR: people and pairs; TPP: sets)."""
    keys = [k for k in FIGURE_LABELS if any(v.get(k) is not None for v in per_series.values())]
    lines = [
        "| series | " + " | ".join(FIGURE_LABELS[k] for k in keys) + " |",
        "|---" * (len(keys) + 1) + "|",
    ]
    for name, v in per_series.items():
        cells = ["—" if v.get(k) is None else f"{v[k]:.3g}" for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return [*lines, ""]
