"""ATM's masking, seen: how targeted the masking of an ATM SAE was at the end of its training (a plug-in;
SAEs of other methods get no section).

Read from the statistics ATM saves beside the SAE (atm_stats.safetensors: the EMAs M, F, R, the importance I,
the threshold θ and the masking probabilities p of the last step). A pure function turns them (and, when
the absorption metric ran in the same eval, its main latents) into numbers; the plug-in's blocks turn those
into a report section. Nothing needs the model or the store.

- fraction above θ: latents ATM never masks;
- mean p: the share of latent slots masked; effective masking rate: the share of *firings* masked, p
  weighted by each latent's firing frequency F (masking a silent latent changes nothing);
- targeting index: std(p)/mean(p), 0 for uniform dropout; and corr(p, F), the Pearson correlation of p
  with firing frequency (undefined, None, when p is constant);
- p of the absorption task's main latents (the latents that carry each first letter) against all latents.
"""

from __future__ import annotations

import math

import numpy as np

from atmpipe.eval.metric import Metric

HIST_BINS = 40
LOG_FLOOR = 1e-12  # log10 I of a latent with I = 0 is drawn at this floor


def stats_of(sae) -> dict[str, np.ndarray] | None:
    """The masking statistics an SAE holds (ATM's, loaded from atm_stats.safetensors; the method says which,
    `SAE.masking_statistics`), or None for a method without them."""
    stats = sae.masking_statistics()
    if stats is None:
        return None
    return {n: (float(v) if n == "theta" else v.detach().double().cpu().numpy()) for n, v in stats.items()}


def diagnostics(stats: dict, hparams: dict, absorption: dict | None = None) -> dict:
    """The masking numbers of one ATM SAE from its statistics (and the absorption metric's result)."""
    imp, p, freq, theta = (np.asarray(stats[k], dtype=np.float64) for k in ("I", "p", "F", "theta"))
    if not np.any(imp) and not np.any(p):
        return {"status": "no statistics", "reason": "the SAE was saved without ATM statistics"}
    mean_p = float(p.mean())
    fired = float(freq.sum())
    out = {
        "status": "ok",
        "threshold_kind": hparams.get("threshold", "linear"),
        "targeting": hparams.get("targeting", "adaptive"),
        "theta": float(theta),
        "frac_above_theta": float((imp >= theta).mean()),
        "mean_p": mean_p,
        "effective_masking_rate": float((p * freq).sum() / fired) if fired > 0 else 0.0,
        "targeting_index": float(p.std() / mean_p) if mean_p > 0 else 0.0,
        "corr_p_firing": _corr(p, freq),
        "importance_quantiles": {q: float(np.quantile(imp, q / 100)) for q in (1, 50, 99)},
        "importance_mean": float(imp.mean()),
        "importance_max": float(imp.max()),
        "hist_log10_importance": _hist(np.log10(np.maximum(imp, LOG_FLOOR))),
        "hist_p": _hist(p, (0.0, 1.0)),
    }
    main = _main_latents(absorption)
    if main is not None:
        out["absorption_main_latents"] = {
            "n": len(main),
            "mean_p": float(p[main].mean()) if main else None,
            "mean_p_all": mean_p,
            "frac_above_theta": float((imp[main] >= theta).mean()) if main else None,
            "mean_percentile_of_p": float(np.mean([(p < p[i]).mean() for i in main])) if main else None,
        }
    return out


def _corr(a: np.ndarray, b: np.ndarray) -> float | None:
    if a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def _hist(values: np.ndarray, range_: tuple[float, float] | None = None) -> dict:
    counts, edges = np.histogram(values, bins=HIST_BINS, range=range_)
    return {"counts": counts.tolist(), "edges": edges.tolist()}


def _main_latents(absorption: dict | None) -> list[int] | None:
    """Every letter's main latents (the union), when the absorption metric ran to completion."""
    if not absorption or absorption.get("status") != "ok":
        return None
    return sorted({m for row in absorption["per_letter"].values() for m in row["main_latents"]})


class Masking(Metric):
    name = "masking"
    rows = [
        ("ATM: targeting index std(p)/mean(p)", "targeting_index", None),
        ("ATM: effective masking rate", "effective_masking_rate", None),
    ]

    def compute(self, ctx, sae) -> dict | None:
        stats = stats_of(sae.sae)
        if stats is None:
            return None
        absorbed = ctx.results.get(sae.name, {}).get("absorption")  # when absorption ran before this
        return diagnostics(stats, sae.info["hparams"], absorbed)

    def blocks(self, names: list[str], results: dict, shared: dict) -> list[tuple]:
        return report_blocks(names, results)


# --- the report section --------------------------------------------------------------------------


def report_blocks(names: list[str], results: dict) -> list[tuple]:
    """The "ATM masking" section: a table per ATM SAE, and histograms of log10 I and p."""
    from atmpipe.eval.report import png  # lazy (eval/metric.py)

    masked = {n: results[n]["masking"] for n in names if results[n].get("masking", {}).get("status") == "ok"}
    if not masked:
        return []
    blocks: list[tuple] = [
        ("h2", "ATM masking diagnostics"),
        (
            "p",
            "How targeted each ATM SAE's masking was at the end of training (its atm_stats.safetensors). "
            "Targeting index = std(p)/mean(p): 0 for uniform dropout. Effective masking rate = the share of "
            "firings masked (p weighted by firing frequency F). corr(p, F): correlation of p with firing "
            "frequency.",
        ),
    ]
    rows = [
        ["threshold · targeting", *(f"{m['threshold_kind']} · {m['targeting']}" for m in masked.values())],
        ["θ", *(_fmt(m["theta"]) for m in masked.values())],
        ["fraction of latents above θ", *(_fmt(m["frac_above_theta"]) for m in masked.values())],
        ["mean p (masked share of latent slots)", *(_fmt(m["mean_p"]) for m in masked.values())],
        [
            "effective masking rate (share of firings)",
            *(_fmt(m["effective_masking_rate"]) for m in masked.values()),
        ],
        ["targeting index std(p)/mean(p)", *(_fmt(m["targeting_index"]) for m in masked.values())],
        ["corr(p, firing frequency)", *(_fmt(m["corr_p_firing"]) for m in masked.values())],
        ["I: median · mean · max", *(_quantiles(m) for m in masked.values())],
        ["p of absorption main latents · of all", *(_main(m) for m in masked.values())],
    ]
    blocks.append(("table", ["", *masked], rows))
    blocks.append(
        (
            "img",
            "atm_masking.png",
            "ATM: importance (log10 I) and masking probability p",
            png(_figure(masked)),
        )
    )
    return blocks


def _fmt(v) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}"


def _quantiles(m: dict) -> str:
    return (
        f"{_fmt(m['importance_quantiles'][50])} · {_fmt(m['importance_mean'])} · {_fmt(m['importance_max'])}"
    )


def _main(m: dict) -> str:
    a = m.get("absorption_main_latents")
    if not a or a["mean_p"] is None:
        return "— (absorption not run)"
    return f"{_fmt(a['mean_p'])} · {_fmt(a['mean_p_all'])} ({a['n']} latents)"


def _figure(masked: dict):
    import matplotlib.pyplot as plt  # lazy (eval/metric.py)

    from atmpipe.eval.report import FIG_DPI, FIG_SIZE  # imported here: the report imports the registry

    fig, (ax_i, ax_p) = plt.subplots(1, 2, figsize=FIG_SIZE, dpi=FIG_DPI)
    for i, (name, m) in enumerate(masked.items()):
        color = f"C{i}"  # one colour per SAE: its histograms and its θ
        for ax, key in ((ax_i, "hist_log10_importance"), (ax_p, "hist_p")):
            h = m[key]
            ax.stairs(h["counts"], h["edges"], label=name, color=color)
        ax_i.axvline(math.log10(max(m["theta"], LOG_FLOOR)), linestyle="--", linewidth=0.8, color=color)
    ax_i.set(xlabel="log10 importance I (dashed: θ)", ylabel="latents", yscale="log")
    ax_p.set(xlabel="masking probability p", ylabel="latents", yscale="log")
    ax_p.legend(fontsize=8)
    fig.tight_layout()
    return fig
