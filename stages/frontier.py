"""The reproduction's aggregate (stages/reproduce.sh): every eval group's results.json → one results.json, a
table at L0 64 (mean ± sd over seeds, the paper's numbers beside), one figure per question, the verdict's
comparisons (stages/verdict.py: verdict.md) and a budget.

A run's name says what it is — VARIANT-L<target L0>-s<seed>[-x<token multiple>], e.g. atm-uniform-L64-s1 or
topk-L64-s0-x4 — and its atmpipe.json must agree on the seed, or the aggregate refuses to mix them up; its
tokens and passes over the store are read from there.
A *series* is a variant at one training length (atm, atm-uniform, atm-x4); its points are L0 levels and its
spread is over seeds. Missing sections (a metric not run, absorption's CI or the masking diagnostics of an
older eval) are left out, never invented.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import tomllib
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import verdict  # noqa: E402  (stages/, beside this file)

from atmpipe.eval.metric import paper_values  # noqa: E402
from atmpipe.eval.metrics import REGISTRY  # noqa: E402
from atmpipe.eval.report import FIG_DPI, FIG_SIZE  # noqa: E402
from atmpipe.sae import SAE_METHODS  # noqa: E402

RUN_NAME = re.compile(r"^(?P<variant>[a-z][a-z0-9.\-]*?)-L(?P<l0>\d+)-s(?P<seed>\d+)(?:-x(?P<times>\d+))?$")
# Every registered method (a new one joins the aggregate with its registry line), the four first as before.
METHODS = [m for m in ("atm", "topk", "jumprelu", "relu") if m in SAE_METHODS]
METHODS += sorted(set(SAE_METHODS) - set(METHODS))
REPO = Path(__file__).resolve().parent.parent  # the plan's recipe paths are relative to it
HEAD_L0 = 64  # the level with seeds, controls and the longer runs
L0_TOLERANCE = 0.05  # matched sparsity: every SAE's measured L0 within ±5% of its level
MASKING_SECTION = "masking"  # the eval's masking diagnostics of ATM SAEs
OTHER_DEFINITION = {"core.mse"}  # metrics whose paper number measures something else
PAPER = paper_values(REGISTRY.values())  # the paper's own numbers, each held by the metric it belongs to
CI_PREFIX = "ci95_"  # absorption's word-bootstrap 95% intervals: ci95_<metric> = [low, high]


# --- runs -----------------------------------------------------------------------------------------


def parse_run(name: str, meta: dict | None = None) -> dict | None:
    """(variant, method, series, L0 target, seed, token multiple) from a run's name; None if not ours.
    `meta` (the run's atmpipe.json "metadata") must agree with the name on the seed."""
    m = RUN_NAME.match(name)
    if m is None:
        return None
    times = int(m["times"] or 1)
    run = {
        "variant": m["variant"],
        "method": m["variant"].split("-")[0],
        "series": m["variant"] + (f"-x{times}" if times > 1 else ""),
        "l0_target": int(m["l0"]),
        "seed": int(m["seed"]),
        "tokens_multiplier": times,
    }
    train_cfg = (meta or {}).get("train_config", {})
    if "seed" in train_cfg and train_cfg["seed"] != run["seed"]:
        raise ValueError(f"run {name} is named seed {run['seed']} but trained with seed {train_cfg['seed']}")
    for key in ("tokens_seen", "epochs", "steps"):
        if key in (meta or {}):
            run[key] = meta[key]
    return run


# Of a section whose status is "unresolved" (SCR or TPP whose data cannot tell 0.1 apart), only the figures
# that say so are kept: never its score, which would be read as a result.
UNRESOLVED_KEPT = {"n_test", "n_pairs", "n_sets", "a_base", "a_oracle", "mdd_headline", "half_width_headline"}


def scalars(result: dict) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Every numeric scalar of one SAE's eval record as {"section.key": value}, and its 95% intervals."""
    flat, ci = {}, {}
    for section, values in result.items():
        if not isinstance(values, dict) or values.get("status") not in (None, "ok", "unresolved"):
            continue
        for key, v in values.items():
            if values.get("status") == "unresolved" and key not in UNRESOLVED_KEPT:
                continue
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                flat[f"{section}.{key}"] = float(v)
            elif key.startswith(CI_PREFIX) and isinstance(v, list) and len(v) == 2:
                name = key[len(CI_PREFIX) :]  # ci95_full_absorption bounds mean_full_absorption
                name = f"mean_{name}" if f"mean_{name}" in values else name
                ci[f"{section}.{name}"] = [float(x) for x in v]
    return flat, ci


def _metadata(sae_info: dict) -> dict | None:
    meta_file = Path(sae_info.get("path", "")) / "atmpipe.json"
    if not meta_file.is_file():
        return None
    return json.loads(meta_file.read_text()).get("metadata")


def eval_groups(results_dir: Path) -> dict[str, dict]:
    """{group: its eval's results.json} for RESULTS_DIR/evals/<group>/results.json."""
    files = sorted((results_dir / "evals").glob("*/results.json"))
    return {f.parent.name: json.loads(f.read_text()) for f in files}


def eval_seed(payload: dict) -> int:
    """The eval seed a group ran with (its config's seed; 0 where an older eval did not record it)."""
    return int((payload.get("run", {}).get("config") or {}).get("seed") or 0)


def collect(results_dir: Path) -> dict[str, dict]:
    """Every run of every eval group under RESULTS_DIR/evals/<group>/results.json, parsed and flattened. A run
    evaluated at several eval seeds (one group per seed: head, head-e1, ...) gets `by_eval_seed` and, as its
    metrics and word intervals, their means over those seeds."""
    runs: dict[str, dict] = {}
    for group, payload in eval_groups(results_dir).items():
        seed = eval_seed(payload)
        for name, result in payload["results"].items():
            run = parse_run(name, _metadata(payload.get("saes", {}).get(name, {})))
            if run is None:
                continue
            metrics, ci = scalars(result)
            entry = runs.setdefault(name, {**run, "name": name, "group": group, "by_eval_seed": {}})
            if seed in entry["by_eval_seed"]:
                earlier = entry["by_eval_seed"][seed]["group"]
                raise ValueError(f"run {name} is in two eval groups at eval seed {seed} ({earlier}, {group})")
            entry["by_eval_seed"][seed] = {"group": group, "metrics": metrics, "ci95": ci}
    for entry in runs.values():
        evals = [entry["by_eval_seed"][s] for s in sorted(entry["by_eval_seed"])]
        keys = sorted({k for e in evals for k in e["metrics"]})
        entry["metrics"] = {
            k: statistics.fmean(e["metrics"][k] for e in evals if k in e["metrics"]) for k in keys
        }
        entry["eval_seeds"] = {k: sum(k in e["metrics"] for e in evals) for k in keys}
        cis = sorted({k for e in evals for k in e["ci95"]})
        entry["ci95"] = {k: [statistics.fmean(e["ci95"][k][i] for e in evals if k in e["ci95"]) for i in (0, 1)] for k in cis}  # fmt: skip
        # one eval seed: its numbers are the run's own, not repeated
        one = len(evals) == 1
        entry["by_eval_seed"] = {str(s): {"group": e["group"]} if one else e for s, e in sorted(entry["by_eval_seed"].items())}  # fmt: skip
    return runs


def word_scores(results_dir: Path) -> dict[str, dict]:
    """{run: {eval seed: {letter: {"words", "word_fraction", "word_full"}}}} from the evals that recorded each
    scored word (stages/verdict.py pairs two SAEs' words with it); runs without them are left out."""
    out: dict[str, dict] = {}
    for payload in eval_groups(results_dir).values():
        seed = eval_seed(payload)
        for name, result in payload["results"].items():
            letters = (result.get("absorption") or {}).get("per_letter", {})
            if letters and all("word_fraction" in v for v in letters.values()):
                out.setdefault(name, {})[seed] = {
                    c: {k: v[k] for k in ("words", "word_fraction", "word_full")} for c, v in letters.items()
                }
    return out


# --- statistics -----------------------------------------------------------------------------------


def spread(values: list[float]) -> dict:
    """Mean and sample standard deviation (n − 1; none for a single seed)."""
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else None,
        "n": len(values),
        "values": values,
    }


def within_sd(members: list[dict], metric: str) -> float | None:
    """The spread of one metric over eval seeds within an SAE, pooled over the cell's SAEs (sd, n − 1 each);
    None with one eval seed."""
    sq, dof = 0.0, 0
    for r in members:
        values = [e["metrics"][metric] for e in r["by_eval_seed"].values() if metric in e.get("metrics", {})]
        if len(values) > 1:
            sq += statistics.variance(values) * (len(values) - 1)
            dof += len(values) - 1
    return math.sqrt(sq / dof) if dof else None


def summarise(runs: dict[str, dict]) -> dict:
    """{series: {L0 target: {"seeds", "metrics": {metric: spread}, "ci95": {metric: mean interval}}}}."""
    cells: dict[str, dict[int, list[dict]]] = {}
    for run in runs.values():
        cells.setdefault(run["series"], {}).setdefault(run["l0_target"], []).append(run)
    summary: dict = {}
    for series, levels in cells.items():
        for l0, members in sorted(levels.items()):
            members.sort(key=lambda r: r["seed"])
            names = sorted({k for r in members for k in r["metrics"]})
            cis = sorted({k for r in members for k in r["ci95"]})
            summary.setdefault(series, {})[l0] = {
                "seeds": [r["seed"] for r in members],
                "runs": [r["name"] for r in members],
                # eval seeds per metric: the fewest any of the cell's SAEs has; and their spread within an SAE
                "eval_seeds": {k: min(r["eval_seeds"].get(k, 0) for r in members) for k in names},
                "eval_sd": {k: within_sd(members, k) for k in names},
                "metrics": {
                    k: spread([r["metrics"][k] for r in members if k in r["metrics"]]) for k in names
                },
                # The word-sampling interval, averaged over seeds: sampling noise of one SAE's number.
                "ci95": {
                    k: [statistics.fmean(r["ci95"][k][i] for r in members if k in r["ci95"]) for i in (0, 1)]
                    for k in cis
                },
            }
    return summary


def l0_match(runs: dict[str, dict], tolerance: float = L0_TOLERANCE) -> dict:
    """Whether every SAE's measured L0 lies within ±tolerance of its level's target."""
    per_run = {
        name: {"target": r["l0_target"], "l0": r["metrics"]["core.l0"], "relative": r["metrics"]["core.l0"] / r["l0_target"] - 1}
        for name, r in runs.items()
        if "core.l0" in r["metrics"]
    }  # fmt: skip
    levels: dict[int, bool] = {}
    for v in per_run.values():
        levels[v["target"]] = levels.get(v["target"], True) and abs(v["relative"]) <= tolerance
    off = sorted(name for name, v in per_run.items() if abs(v["relative"]) > tolerance)
    return {
        "tolerance": tolerance,
        "matched": all(levels.values()) if levels else None,
        "levels": {str(k): v for k, v in sorted(levels.items())},
        "outside": off,
        "runs": per_run,
    }


# --- table ----------------------------------------------------------------------------------------


def _series_order(names) -> list[str]:
    """The four methods first (in METHODS' order), then their variants, then the longer runs."""

    def key(series: str):
        base = series.rsplit("-x", 1)[0]
        return ("-x" in series, METHODS.index(base) if base in METHODS else len(METHODS), series)

    return sorted(names, key=key)


def _mean_sd(cell: dict | None, ci: list[float] | None = None) -> str:
    if cell is None:
        return "—"
    text = (
        f"{cell['mean']:.4g}" + (f" ± {cell['sd']:.2g}" if cell["sd"] is not None else "") + f" ({cell['n']})"
    )
    return text + (f" [CI {ci[0]:.3g}–{ci[1]:.3g}]" if ci else "")


def absorption_note(groups: dict[str, dict]) -> str:
    """What absorption was measured on (protocol, word sample), from the first eval that says; "" if none."""
    for payload in groups.values():
        a = payload.get("shared", {}).get("absorption", {})
        if "protocol" in a:
            sample = a.get("sample", {})
            return (
                f"Absorption: protocol {a['protocol']}, {sample.get('words')} words ({sample.get('kind')}, seed "
                f"{sample.get('seed')}), {a.get('n_words_test')} test words; CI: 95% bootstrap over the scored "
                "words (word sampling only, not the probes' randomness).\n"
            )
    return ""


def table(summary: dict, level: int = HEAD_L0) -> str:
    """Markdown: every metric at one L0 level, mean ± sd (seeds) per series, and the paper's own numbers."""
    series = _series_order(s for s in summary if level in summary[s])
    rows = [(f"{name}.{key}", entry) for name, metric in REGISTRY.items() for _, key, entry in metric.rows]
    # The paper's MSE (0.5508) is not atmpipe's core.mse (squared error summed over the model dimension, per
    # token: ~1e5-1e6 here): another definition, so it is not printed beside it.
    paper = {key: PAPER[entry] for key, entry in rows if entry and key not in OTHER_DEFINITION}
    ordered = [key for key, _ in rows]  # the eval report's order first
    found = {k for s in series for k in summary[s][level]["metrics"]}
    metrics = [k for k in ordered if k in found] + sorted(found - set(ordered))
    lines = [
        f"At target L0 {level}: mean ± sd over seeds (number of seeds) [absorption's word-sampling 95% CI, "
        "mean over seeds]. The last column is the paper's (Gemma-2-2b, SAEBench), not ours.",
        "",
        "| metric | " + " | ".join(series) + " | paper's (Gemma-2-2b) |",
        "|---" * (len(series) + 2) + "|",
    ]
    for k in metrics:
        row = [
            _mean_sd(summary[s][level]["metrics"].get(k), summary[s][level]["ci95"].get(k)) for s in series
        ]
        lines.append(f"| {k} | " + " | ".join(row) + f" | {paper.get(k, '')} |")
    return "\n".join(lines) + "\n"


# --- figures --------------------------------------------------------------------------------------

LINE_PLOTS = [  # (file, metric, y label, title)
    ("fvu_vs_l0.png", "core.fvu", "FVU (lower is better)", "Reconstruction across sparsity"),
    ("ce_score_vs_l0.png", "core.ce_loss_score", "CE loss score (higher is better)", "Downstream loss"),
    (
        "absorption_fraction_vs_l0.png",
        "absorption.mean_absorption_fraction",
        "absorption fraction (lower is better)",
        "Absorption fraction across sparsity",
    ),
    (
        "full_absorption_vs_l0.png",
        "absorption.mean_full_absorption",
        "full absorption (lower is better)",
        "Full absorption across sparsity",
    ),
]
CAPTION = "error bars: sd over seeds where there are seeds; shaded: word-sampling 95% CI"


def _save(fig, path: Path) -> None:
    if fig.get_layout_engine() is None:  # a figure with a legend outside its axes lays itself out
        fig.tight_layout()
    fig.savefig(path, dpi=FIG_DPI)
    plt.close(fig)


def _point(cell: dict, metric: str):
    """(mean, sd or 0) of a metric in one summary cell, or None where it was not measured."""
    m = cell["metrics"].get(metric)
    return None if m is None else (m["mean"], m["sd"] or 0.0)


def line_vs_l0(summary: dict, metric: str, ylabel: str, title: str, path: Path) -> bool:
    """One line per method over its measured L0 (seed 0 and, where trained, seeds 1-2); False if no data."""
    fig, ax = plt.subplots(figsize=FIG_SIZE)
    drawn = False
    for method in (m for m in METHODS if m in summary):
        pts = []
        for cell in summary[method].values():
            x, y = _point(cell, "core.l0"), _point(cell, metric)
            if x and y:
                pts.append((x, y, cell["ci95"].get(metric)))
        if not pts:
            continue
        pts.sort(key=lambda p: p[0][0])
        xs, ys = [p[0][0] for p in pts], [p[1][0] for p in pts]
        line = ax.errorbar(xs, ys, yerr=[p[1][1] for p in pts], marker="o", capsize=4, label=method)
        for (x, _), _, ci in pts:
            if ci:
                ax.plot([x, x], ci, color=line[0].get_color(), alpha=0.25, linewidth=8, solid_capstyle="butt")
        drawn = True
    if drawn:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("L0 (measured mean active latents per token)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}\n({CAPTION})", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend()
        _save(fig, path)
    else:
        plt.close(fig)
    return drawn


def tradeoff(summary: dict, path: Path, level: int = HEAD_L0) -> bool:
    """Absorption against FVU at one L0 for every series (two panels: full absorption, fraction)."""
    series = _series_order(s for s in summary if level in summary[s])
    panels = [("absorption.mean_full_absorption", "full absorption"), ("absorption.mean_absorption_fraction", "absorption fraction")]  # fmt: skip
    fig, axes = plt.subplots(1, 2, figsize=FIG_SIZE, layout="constrained")
    drawn = False
    # One colour per series in both panels and a shared legend: labels beside the points overlapped where
    # variants land close together. A longer run is a square; FVU on a log axis, as the controls span ×10.
    colours = {s: f"C{i % 10}" for i, s in enumerate(series)}
    for ax, (metric, label) in zip(axes, panels, strict=True):
        for s in series:
            x, y = _point(summary[s][level], "core.fvu"), _point(summary[s][level], metric)
            if x and y:
                marker = "s" if "-x" in s else "o"
                ax.errorbar(x[0], y[0], xerr=x[1], yerr=y[1], marker=marker, color=colours[s], capsize=3, label=s)  # fmt: skip
                drawn = True
        ax.set_xscale("log")
        ax.set_xlabel("FVU (log scale)")
        ax.set_ylabel(f"{label} (lower is better)")
        ax.grid(alpha=0.3, which="both")
    if drawn:
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside right center", fontsize=8)
        fig.suptitle(f"Absorption vs reconstruction at L0 {level} (error bars: sd over seeds)", fontsize=10)
        _save(fig, path)
    else:
        plt.close(fig)
    return drawn


def masking_plot(summary: dict, path: Path, level: int = HEAD_L0) -> bool:
    """The eval's masking diagnostics of every ATM series at one L0: one panel per diagnostic."""
    series = [s for s in _series_order(summary) if s.startswith("atm") and level in summary[s]]
    prefix = MASKING_SECTION + "."
    keys = sorted({k for s in series for k in summary[s][level]["metrics"] if k.startswith(prefix)})
    if not keys:
        return False
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=FIG_SIZE, squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        pts = [(s, _point(summary[s][level], key)) for s in series]
        pts = [(s, p) for s, p in pts if p]
        ax.bar(range(len(pts)), [p[0] for _, p in pts], yerr=[p[1] for _, p in pts], capsize=3)
        ax.set_xticks(range(len(pts)), [s for s, _ in pts], rotation=45, ha="right", fontsize=7)
        ax.set_title(key[len(prefix) :], fontsize=8)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.suptitle(f"ATM masking diagnostics at L0 {level} (error bars: sd over seeds)", fontsize=10)
    _save(fig, path)
    return True


# --- provenance -----------------------------------------------------------------------------------


def code_of(runs: dict[str, dict], stages: dict[str, dict]) -> dict[str, set | None]:
    """Per run, the code versions (commit, diff sha256) its training and its evals ran at; None where a
    stage's version was not recorded (runs made before stages recorded theirs)."""
    out: dict[str, set | None] = {}
    for name, run in runs.items():
        keys = [f"train-{name}", f"converge-train-{name}"]
        train = next((stages[k] for k in keys if k in stages), None)
        groups = [e["group"] for e in run["by_eval_seed"].values()]
        evals = [stages.get(f"eval-{g}") or stages.get(f"converge-eval-{_eval_stage(g)}") for g in groups]
        found = [train, *evals]
        out[name] = None if None in found else {(v["commit"], v["diff_sha256"]) for v in found}
    return out


def _eval_stage(group: str) -> str:
    """converge.sh names an eval group's stage by group and seed: length-e1 → length-e1, length → length-e0."""
    return group if re.search(r"-e\d+$", group) else f"{group}-e0"


def mark_code(rows: list[dict], summary: dict, code: dict[str, set | None]) -> None:
    """Each comparison says whether everything on both sides ran at one code version ("same_code": True),
    at several (False: re-run what the change touched before trusting it) or is unknown (None)."""
    for r in rows:
        if "a" not in r:
            continue
        names = [n for s in (r["a"], r["b"]) for n in summary[s][str(r["l0"])].get("runs", [])]
        versions = [code.get(n) for n in names]
        r["same_code"] = None if not names or None in versions else len(set().union(*versions)) == 1


# --- outputs --------------------------------------------------------------------------------------


def write(results_dir: Path, head: int = HEAD_L0, suffix: str = "") -> dict:
    """results.json, table.md and the figures in RESULTS_DIR, from RESULTS_DIR/evals/*/results.json; `head`
    is the L0 level of the table, the trade-off and the masking figures; `suffix` the training length the
    verdict is stated at ("-x16" for the convergence runs, stages/converge.sh)."""
    groups, runs = eval_groups(results_dir), collect(results_dir)
    summary = summarise(runs)
    figures = {
        file: line_vs_l0(summary, metric, ylabel, title, results_dir / file)
        for file, metric, ylabel, title in LINE_PLOTS
    }
    tradeoff_file, masking_file = f"absorption_vs_fvu_l0_{head}.png", "masking_diagnostics.png"
    figures[tradeoff_file] = tradeoff(summary, results_dir / tradeoff_file, head)
    figures[masking_file] = masking_plot(summary, results_dir / masking_file, head)
    for file, drawn in figures.items():  # a figure whose data is gone is not left behind stale
        if not drawn:
            (results_dir / file).unlink(missing_ok=True)
    by_level = {s: {str(l0): cell for l0, cell in levels.items()} for s, levels in summary.items()}
    others = [m for m in METHODS if m != "atm"]
    comparisons = verdict.comparisons(by_level, head, word_scores(results_dir), suffix, others)
    claims = verdict.claims(by_level, head, others, suffix)
    record = results_dir / "experiment.json"
    stages = json.loads(record.read_text()).get("provenance", {}).get("stages", {}) if record.exists() else {}
    code = code_of(runs, stages)
    mark_code(comparisons, by_level, code)
    mark_code(claims["probing"]["rows"] + [r for s in ("bias", "tpp") for r in claims["bias"][s].get("rows", [])], by_level, code)  # fmt: skip
    payload = {
        "experiment": "L0 frontier with seeds, ATM masking controls, Matryoshka and 4x training (stages/reproduce.sh)",
        "l0_match": l0_match(runs),
        "summary": by_level,
        "comparisons": comparisons,
        "claims": claims,
        "runs": runs,
        "evals": {
            g: {"config": p.get("run", {}).get("config"), "shared": p.get("shared")}
            for g, p in groups.items()
        },
        "figures": sorted(f for f, drawn in figures.items() if drawn),
        "paper_gemma_2_2b": PAPER,
        "note": "summary: per series and L0, mean and sd (n - 1) over training seeds of each SAE's mean over its "
        "eval seeds (eval_seeds: how many; eval_sd: their spread within an SAE); ci95: absorption's "
        "word-bootstrap interval, mean over seeds; comparisons: stages/verdict.py says what each interval "
        "carries; claims: the paper's claims 3-5 answered one by one (stages/verdict.py claims)",
    }
    (results_dir / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    has_head = any(head in levels for levels in summary.values())
    (results_dir / "table.md").write_text(table(summary, head) + absorption_note(groups) if has_head else "")
    (results_dir / "verdict.md").write_text(verdict.markdown(comparisons, claims))
    return payload


# --- budget ---------------------------------------------------------------------------------------


def plan_stages(plan: str) -> list[tuple[str, str, str]]:
    """(name, done|todo, command) of every stage in `PLAN_ONLY=1 bash stages/reproduce.sh`'s output."""
    return [tuple(line.split("\t", 2)) for line in plan.splitlines() if line.count("\t") >= 2]


def stage_seconds(name: str, command: str, seconds: dict) -> float:
    """A stage's expected wall time from measured ones: `train_s` per method or variant (one pass over the
    2^21-token base) or per longer series (atm-x4: the whole run, where passes do not cost alike), `eval_s` =
    {"first": LM passes + loading, "per_sae": s}, `<stage>_s` (harvest_s, crosscheck_s, converge-harvest_s).
    The convergence part's stages (converge-train-…, converge-eval-…) cost as the 2M part's do."""
    short = name.removeprefix("converge-")
    if short.startswith("train-"):
        run = parse_run(short[len("train-") :])
        if run["tokens_multiplier"] > 1 and run["series"] in seconds["train_s"]:
            return seconds["train_s"][run["series"]]
        per_pass = seconds["train_s"].get(run["variant"], seconds["train_s"][run["method"]])
        return per_pass * run["tokens_multiplier"]
    if short.startswith("eval-"):
        return eval_parts(command, seconds["eval_s"])[1] * command.count("--sae=")
    return seconds.get(f"{name}_s", 0.0)


def _flag(command: str, name: str, default: str) -> str:
    words = command.split()
    return next((words[i + 1] for i, w in enumerate(words[:-1]) if w == name), default)


LABELLED = {"probing", "bias", "tpp"}  # the metrics that read the sae-probes texts (cached per eval seed)


def eval_metrics(command: str) -> set[str] | None:
    """The metrics an eval stage runs: its --metrics flag, else its recipe's (--config); None if unknown."""
    if flag := _flag(command, "--metrics", "").replace("\\", ""):  # the plan's %q escapes the commas
        return set(flag.split(","))
    recipe = REPO / _flag(command, "--config", "-")
    if recipe.is_file() and (listed := tomllib.loads(recipe.read_text()).get("metrics")):
        return set(listed.split(","))
    return None


def eval_parts(command: str, eval_s: dict) -> tuple[list[str], float]:
    """An eval stage's LM parts (keys of eval_s["first"], each paid once per eval seed) and its seconds per
    SAE. eval_s: "first" (seconds, or {part: seconds}: "absorption" its prompts, "labelled" the probing, SCR
    and TPP texts, "other" the rest), "per_sae" (every metric but the labelled ones), "per_sae_labelled"
    (what probing, SCR and TPP add), "per_sae_absorption_only" (an eval of absorption alone)."""
    first = eval_s["first"] if isinstance(eval_s["first"], dict) else {"other": eval_s["first"]}
    metrics = eval_metrics(command)
    if metrics is None:  # not known: every part
        return list(first), eval_s["per_sae"] + eval_s.get("per_sae_labelled", 0.0)
    needs = {"absorption": "absorption" in metrics, "labelled": bool(metrics & LABELLED)}
    parts = [p for p in first if needs.get(p, bool(metrics - LABELLED - {"absorption"}))]
    if metrics == {"absorption"} and "per_sae_absorption_only" in eval_s:
        return parts, eval_s["per_sae_absorption_only"]
    return parts, eval_s["per_sae"] + (eval_s.get("per_sae_labelled", 0.0) if needs["labelled"] else 0.0)


def budget_seconds(plan: str, seconds: dict) -> list[tuple[str, str, float, float]]:
    """(stage, status, seconds, of which LM-bound seconds) for every stage of a plan. Each part of the eval's
    LM passes (eval_parts) is paid once per eval seed (its prompts and splits differ), at the first eval that
    needs it, whichever part of the plan that is (the eval cache is per model and layer, not per store)."""
    rows, paid = [], set()
    first = seconds["eval_s"]["first"]
    first = first if isinstance(first, dict) else {"other": first}
    for name, status, command in plan_stages(plan):
        s = 0.0 if status == "done" else stage_seconds(name, command, seconds)
        lm = s if name.endswith("harvest") else 0.0
        if name.removeprefix("converge-").startswith("eval-"):
            seed = _flag(command, "--seed", "0")
            new = [p for p in eval_parts(command, seconds["eval_s"])[0] if (seed, p) not in paid]
            paid.update((seed, p) for p in new)
            lm = 0.0 if status == "done" else sum(first[p] for p in new)
            s += lm
        rows.append((name, status, s, lm))
    return rows


def without_estimates(seconds: dict, paths: list[str] | None = None) -> dict:
    """`seconds` with every input its "estimated" list names (dotted paths: "eval_s.first.labelled"), or only
    those of `paths`, set to 0."""
    out = json.loads(json.dumps(seconds))
    for path in seconds.get("estimated", []) if paths is None else paths:
        *parents, leaf = path.split(".")
        node = out
        for key in parents:
            node = node[key]
        if isinstance(node.get(leaf), dict):
            raise ValueError(f"estimated input {path} is a table; name its entries")
        if leaf not in node:
            raise ValueError(f"estimated input {path} is not an input of the budget")
        node[leaf] = 0.0
    return out


def print_budget(plan: str, seconds: dict, limit_h: float = 16.0) -> float:
    """Per stage and in total, the wall time the unfinished part of a plan needs; returns the hours. A stage
    whose time uses an input listed in `seconds["estimated"]` is marked, and the total says how much of it
    rests on estimates. With `seconds["bf16_not_measured"]` ({"train": ×, "lm": ×}), also the total those
    speed-ups would give."""
    rows = budget_seconds(plan, seconds)
    measured = [s for _, _, s, _ in budget_seconds(plan, without_estimates(seconds))]
    print(f"{'stage':44} {'status':6} {'minutes':>8}  basis")
    for (name, status, s, _), m in zip(rows, measured, strict=True):
        basis = "" if s == 0 else "measured" if m == s else "estimate" if m == 0 else "part estimate"
        print(f"{name:44} {status:6} {s / 60:8.1f}  {basis}")
    total = sum(s for _, _, s, _ in rows)
    hours = total / 3600
    verdict = "within" if hours <= limit_h else "OVER"
    print(f"{'total':44} {'':6} {total / 60:8.1f}  = {hours:.2f} h ({verdict} {limit_h:g} h on these times)")
    if seconds.get("estimated"):
        guessed = (total - sum(measured)) / 3600
        used = [
            f"{path} {(total - sum(s for _, _, s, _ in budget_seconds(plan, without_estimates(seconds, [path])))) / 3600:.2f} h"
            for path in seconds["estimated"]
        ]  # fmt: skip
        used = [u for u in used if not u.endswith(" 0.00 h")]
        print(
            f"of which {guessed:.2f} h rest on estimates, not measurements ({', '.join(used)}; the budget file's "
            "'about' says how each was made)"
        )
    speed = seconds.get("bf16_not_measured")
    if speed:
        faster = sum(
            (s / speed["train"] if "train-" in n else s - lm + lm / speed["lm"]) for n, _, s, lm in rows
        )
        print(
            f"with bf16 at the speed-ups quoted, NOT measured here (training ×{speed['train']:g}, LM passes "
            f"×{speed['lm']:g}): {faster / 3600:.2f} h"
        )
    return hours
