"""The comparisons behind the README's verdict on ATM, from the reproduction's summary (stages/frontier.py):
each one a difference between two series at one L0 level, with a 95% interval, written to verdict.md and
results.json's "comparisons" so every sentence of the verdict can be checked against a number.

The uncertainty of one series' mean at one level has two independent parts, added in quadrature:
* seeds: sd / √n over its seeds (SAE training and the eval's probes, on a fixed word sample), widened by
  t(0.975, n − 1) / 1.96 (×2.2 for 3 seeds) so that a spread from a few seeds is not over-trusted;
* words: for absorption, the word-bootstrap 95% CI (half-width / 1.96), the noise of the word sample.
A single-seed cell (the frontier's other levels, the longer runs) has no sd of its own: it borrows the sd its
method's series measured at the head level, and says so. A difference is *separated* when its 95% interval
(± 1.96 standard errors) excludes 0.
"""

from __future__ import annotations

import math

from scipy.stats import t as student_t

METRICS = {  # metric → how the verdict names it (all four are compared everywhere)
    "absorption.mean_absorption_fraction": "absorption fraction",
    "absorption.mean_full_absorption": "full absorption",
    "core.fvu": "FVU",
    "core.ce_loss_score": "CE loss score",
}
OTHERS = ["topk", "jumprelu", "relu"]
CONTROLS = ["atm-uniform", "atm-log", "atm-r0.5"]
Z95 = 1.96


def _base(series: str) -> str:
    """The method series whose head-level seeds stand in for a single-seed cell's (atm-x4 → atm)."""
    return series.rsplit("-x", 1)[0]


def estimate(summary: dict, series: str, level: str, metric: str, head: str) -> dict | None:
    """Mean, standard error and where the seed part of it came from; None where it was not measured."""
    cell = summary.get(series, {}).get(level)
    m = None if cell is None else cell["metrics"].get(metric)
    if m is None:
        return None
    sd, dof, source = m["sd"], m["n"] - 1, "seeds"
    if sd is None:  # one seed: the same method's spread at the head level
        ref = summary.get(_base(series), {}).get(head, {}).get("metrics", {}).get(metric)
        sd, dof, source = (ref["sd"], ref["n"] - 1, f"sd from L0 {head}") if ref and ref["sd"] is not None else (0.0, 0, "no sd")  # fmt: skip
    seeds = sd / math.sqrt(m["n"]) * (student_t.ppf(0.975, dof) / Z95 if dof else 1.0)
    ci = cell["ci95"].get(metric)
    words = (ci[1] - ci[0]) / 2 / Z95 if ci else 0.0
    return {
        "mean": m["mean"],
        "n": m["n"],
        "se": math.hypot(seeds, words),
        "sd_from": source,
    }


def difference(a: dict, b: dict) -> dict:
    """a − b with its 95% interval."""
    diff, se = a["mean"] - b["mean"], math.hypot(a["se"], b["se"])
    low, high = diff - Z95 * se, diff + Z95 * se
    return {"diff": diff, "se": se, "ci95": [low, high], "separated": low > 0 or high < 0}


def compare(summary: dict, a: str, b: str, level: str, head: str, question: str) -> list[dict]:
    rows = []
    for metric in METRICS:
        ea, eb = (estimate(summary, s, level, metric, head) for s in (a, b))
        if ea and eb:
            rows.append({"question": question, "l0": int(level), "a": a, "b": b, "metric": metric,
                         a: ea, b: eb} | difference(ea, eb))  # fmt: skip
    return rows


def gap_change(summary: dict, head: str, times: int) -> list[dict]:
    """How ATM's distance to TopK at the head level moves with `times`× the tokens: (atm − topk) at ×times
    ("gap_longer") minus (atm − topk) at ×1 ("gap_x1"), per metric."""
    rows = []
    for metric in METRICS:
        cells = [
            estimate(summary, s, head, metric, head)
            for s in ("atm", "topk", f"atm-x{times}", f"topk-x{times}")
        ]
        if not all(cells):
            continue
        once, longer = difference(cells[0], cells[1]), difference(cells[2], cells[3])
        change = difference(*({"mean": r["diff"], "se": r["se"]} for r in (longer, once)))
        rows.append({"question": f"ATM − TopK gap, ×{times} tokens minus ×1", "l0": int(head), "metric": metric,
                     "gap_x1": once, "gap_longer": longer} | change)  # fmt: skip
    return rows


def comparisons(summary: dict, head: int) -> list[dict]:
    """Every comparison the verdict needs that the summary can answer (missing series are skipped)."""
    h = str(head)
    rows = []
    levels = sorted(summary.get("atm", {}), key=int)
    for level in levels:
        for other in OTHERS:
            rows += compare(summary, "atm", other, level, h, "ATM against each method at matched L0")
    for control in CONTROLS:
        rows += compare(summary, control, "atm", h, h, "ATM's masking controls against ATM")
    # ATM is ReLU + L1 with masking on top: each control against that base says what masking alone buys
    for control in CONTROLS:
        rows += compare(summary, control, "relu", h, h, "ATM's masking controls against ReLU + L1")
    for times in sorted({int(s.rsplit("-x", 1)[1]) for s in summary if "-x" in s}):
        rows += compare(summary, f"atm-x{times}", "atm", h, h, f"ATM at ×{times} tokens against ×1")
        rows += gap_change(summary, h, times)
    return rows


def _pm(e: dict) -> str:
    tag = "" if e["sd_from"] == "seeds" else f", {e['sd_from']}"
    return f"{e['mean']:.3f} ± {Z95 * e['se']:.3f} (n {e['n']}{tag})"


def markdown(rows: list[dict]) -> str:
    """One table per question; numbers to 3 decimals, ± the 95% half-width."""
    lines = [
        "# The verdict's numbers (generated by stages/verdict.py from results.json's summary)",
        "",
        "Each cell: mean ± 95% half-width (seeds' sd/√n widened by t(0.975, n − 1)/1.96 and, for "
        "absorption, the word-sampling CI, in quadrature; a single-seed cell borrows its method's sd at the "
        "head level). *Separated*: the difference's 95% interval excludes 0.",
    ]
    question = None
    for r in rows:
        if r["question"] != question:
            question = r["question"]
            lines += ["", f"## {question}", ""]
            if "a" in r:
                lines += ["| L0 | metric | A | B | A − B [95%] | separated |", "|---|---|---|---|---|---|"]
            else:
                lines += ["| L0 | metric | gap ×1 | gap longer | change [95%] | separated |", "|---|---|---|---|---|---|"]  # fmt: skip
        interval = f"{r['diff']:+.3f} [{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}]"
        if "a" in r:
            cells = f"{r['a']} {_pm(r[r['a']])} | {r['b']} {_pm(r[r['b']])}"
        else:
            cells = f"{r['gap_x1']['diff']:+.3f} | {r['gap_longer']['diff']:+.3f}"
        lines.append(f"| {r['l0']} | {METRICS[r['metric']]} | {cells} | {interval} | {'yes' if r['separated'] else 'no'} |")  # fmt: skip
    return "\n".join(lines) + "\n"
