"""Summarise an eval's probing, SCR and TPP results (results.json) as markdown, with each headline's 95%
half-width checked against the resolving-power targets: ≤ 0.015 for mean probing accuracy, ≤ 0.05 for SCR
and TPP.

    python stages/probing_summary.py "title" REPORT_DIR/results.json [MORE/results.json ...] > summary.md

Several results files (e.g. one eval per metric) are merged per SAE.
"""

from __future__ import annotations

import json
import sys

TARGETS = {"probing": 0.015, "scr": 0.05, "tpp": 0.05}
KS = (1, 2, 5, 10, 20)


def pm(iv: dict) -> str:
    return f"{iv['mean']:.3f} ± {iv['half_width']:.3f}"


def met(hw: float, target: float) -> str:
    return f"{hw:.3f} {'≤' if hw <= target else '>'} {target} ({'met' if hw <= target else 'NOT met'})"


def probing_lines(results: dict, shared: dict) -> list[str]:
    base = shared["probing_baselines"]["groups"]
    some = next(iter(results.values()))["probing"]["groups"]
    lines = [
        "## Sparse probing: mean over tasks (95% intervals: test bootstrap + 3 probe seeds)",
        "",
        f"{some['all']['sae_top_1']['n_tasks']} tasks; sentiment group: {some['sentiment']['sae_top_1']['n_tasks']} sets.",
        "",
        "| method | "
        + " | ".join(f"k={k}" for k in KS)
        + " | sentiment k=1 | sentiment k=5 | beats resid k=1 | beats resid k=5 |",
        "|---" * (len(KS) + 5) + "|",
    ]
    for name, r in results.items():
        g = r["probing"]["groups"]
        shares = [
            f"{r['probing'][f'share_beats_resid_top_{k}']:.2f} ({r['probing'][f'share_beats_resid_top_{k}_separated']:.2f})"
            for k in (1, 5)
        ]
        cells = [pm(g["all"][f"sae_top_{k}"]) for k in KS] + [
            pm(g["sentiment"][f"sae_top_{k}"]) for k in (1, 5)
        ]
        lines.append(f"| {name} | " + " | ".join(cells + shares) + " |")
    cells = [pm(base["all"][f"resid_top_{k}"]) for k in KS] + [
        pm(base["sentiment"][f"resid_top_{k}"]) for k in (1, 5)
    ]
    lines.append("| residual dims | " + " | ".join(cells) + " | | |")
    lines.append(
        f"| full residual | {pm(base['all']['resid_full'])} |"
        + " |" * (len(KS) - 1)
        + f" {pm(base['sentiment']['resid_full'])} | | | |"
    )
    lines += ["", "Beats: share of tasks where the SAE's top-k probe scores above the top-k residual dimensions "
              "(in brackets: the paired difference's 95% interval above 0).", ""]  # fmt: skip
    return lines


def bias_tpp_lines(results: dict) -> list[str]:
    lines = ["## SCR and TPP at N = 20", "", "| SAE | SCR | n test (pairs) | A_base | A_oracle | MDD | TPP | MDD |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in results.items():
        b, t = r.get("bias", {}), r.get("tpp", {})
        scr = (
            f"{b['scr_headline']:.3f} [{b['ci95_scr_headline'][0]:.3f}, {b['ci95_scr_headline'][1]:.3f}]"
            if "scr" in b
            else b.get("status", "—")
        )
        tpp = (
            f"{t['tpp_headline']:.3f} [{t['ci95_tpp_headline'][0]:.3f}, {t['ci95_tpp_headline'][1]:.3f}]"
            if "tpp" in t
            else "—"
        )
        lines.append(
            f"| {name} | {scr} | {b.get('n_test', '—')} ({b.get('n_pairs', '—')}) | {b.get('a_base', float('nan')):.3f} | "
            f"{b.get('a_oracle', float('nan')):.3f} | {b.get('mdd_headline', float('nan')):.3f} | {tpp} | {t.get('mdd_headline', float('nan')):.3f} |"
        )  # fmt: skip
    return lines + [""]


def target_lines(results: dict) -> list[str]:
    lines = ["## Half-widths against the targets", ""]
    for name, r in results.items():
        parts = []
        if "probing" in r:
            hw = r["probing"]["groups"]["all"]["sae_top_1"]["half_width"]
            parts.append(f"probing mean k=1 {met(hw, TARGETS['probing'])}")
        if "half_width_headline" in r.get("bias", {}):
            parts.append(f"SCR {met(r['bias']['half_width_headline'], TARGETS['scr'])}")
        if "half_width_headline" in r.get("tpp", {}):
            parts.append(f"TPP {met(r['tpp']['half_width_headline'], TARGETS['tpp'])}")
        lines.append(f"- {name}: " + "; ".join(parts))
    return lines + [""]


def timing_lines(results: dict, shared: dict) -> list[str]:
    lines = ["## Seconds (this run; the LM activations came from the cache where `*_collect` is small)", ""]
    lines.append("- run-wide: " + ", ".join(f"{k} {v:.0f}" for k, v in shared.get("seconds", {}).items()))
    for name, r in results.items():
        per = {m: r[m].get("seconds") for m in ("probing", "bias", "tpp") if m in r}
        lines.append(f"- {name}: " + ", ".join(f"{m} {s:.0f}" for m, s in per.items() if s is not None))
    return lines + [""]


def load(paths: list[str]) -> dict:
    """The results files merged: each SAE's sections and the shared sections of all of them."""
    doc = {"results": {}, "shared": {"sizes": {}}, "config": {}}
    for path in paths:
        one = json.loads(open(path).read())
        for name, r in one["results"].items():
            doc["results"].setdefault(name, {}).update(r)
        sizes = one["shared"].pop("sizes", {})
        doc["shared"]["sizes"].update(sizes)
        doc["shared"].setdefault("seconds", {}).update(one["shared"].pop("seconds", {}))
        doc["shared"].update(one["shared"])
        metrics = one["run"]["metrics"]
        doc["config"].update({k: v for k, v in one["run"]["config"].items() if k.split("_")[0] in metrics})
    return doc


def optional_lines(doc: dict) -> list[str]:
    results = doc["results"]
    lines = []
    if all("probing" in r for r in results.values()):
        sizes = doc["shared"]["sizes"]["probing"]
        lines += [
            f"Probing test texts: {sum(s['test'] for s in sizes.values())} over {len(sizes)} tasks.",
            "",
        ]
        lines += probing_lines(results, doc["shared"])
    if any("bias" in r or "tpp" in r for r in results.values()):
        lines += bias_tpp_lines(results)
    return lines


def main(title: str, paths: list[str]) -> None:
    doc = load(paths)
    lines = [f"# {title}", "", f"Run config: {json.dumps(doc['config'])}", ""]
    lines += optional_lines(doc) + target_lines(doc["results"]) + timing_lines(doc["results"], doc["shared"])
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
