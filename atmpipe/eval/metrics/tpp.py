"""Targeted probe perturbation (TPP) as a plug-in (the computations are in `atmpipe.eval.compute.tpp`)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from atmpipe.errors import UserError
from atmpipe.eval import data
from atmpipe.eval.metric import Metric, option
from atmpipe.eval.metrics.probing import TextOptions, split_inputs

N_VALUES = (2, 5, 10, 20, 50, 100, 500)  # SAEBench's
HEADLINE_N = 20


@dataclass
class TppOptions(TextOptions):
    tpp_sets: str = option(",".join(data.CLASS_SETS), "Comma list of multi-class sets for TPP (default all).")
    tpp_train: int = option(500, "Training texts per class for TPP's probes.")
    tpp_test: int = option(250, "Test texts per class for TPP (at most half a class).")


class Tpp(Metric):
    name = "tpp"
    Options = TppOptions
    needs = frozenset({"lm"})
    rows = [("TPP at N=20, mean over sets", "tpp_headline", None)]

    def check(self) -> None:
        self.sets = [s.strip() for s in self.opts.tpp_sets.split(",") if s.strip()]
        unknown = [s for s in self.sets if s not in data.CLASS_SETS]
        if unknown or not self.sets:
            known = ", ".join(data.CLASS_SETS)
            raise UserError(f"unknown TPP set {', '.join(unknown) or '(none)'}; known: {known}")

    def prepare(self, ctx) -> None:
        o = self.opts
        data_dir = Path(o.probing_data) if o.probing_data else None
        self.splits = {
            s: data.class_split(data.CLASS_SETS[s], o.tpp_train, o.tpp_test, ctx.seed, data_dir)
            for s in self.sets
        }

    def set_inputs(self, ctx, s: str) -> dict:
        sp = self.splits[s]
        key = {"set": s, "n_train": self.opts.tpp_train, "n_test": self.opts.tpp_test, "seed": ctx.seed}
        return split_inputs(ctx, f"tpp-{s}", sp, self.opts.probing_context, key)

    def collect(self, ctx) -> None:
        """Each set's LM activations into the cache, its pooled residual and its per-class probes."""
        from atmpipe.eval.compute import probing, tpp  # lazy (eval/metric.py)

        self.pooled, self.probes, quality, start = {}, {}, {}, time.perf_counter()
        for s in self.sets:
            d = self.set_inputs(ctx, s)
            R = {k: probing.mean_pool(d[f"{k}_acts"], d[f"{k}_offsets"]) for k in ("train", "test")}
            self.pooled[s] = R | {"train_labels": d["train_labels"], "test_labels": d["test_labels"]}
            n_classes = len(data.CLASS_SETS[s].classes)
            self.probes[s] = tpp.class_probes(
                R["train"], d["train_labels"], R["test"], d["test_labels"], n_classes, ctx.seed
            )
            quality[s] = {
                cls: float(p["clean"].mean())
                for cls, p in zip(data.CLASS_SETS[s].classes, self.probes[s], strict=True)
            }
        ctx.shared["tpp_probe_accuracy"] = quality
        ctx.shared.setdefault("seconds", {})["tpp_collect"] = time.perf_counter() - start
        ctx.shared["sizes"]["tpp"] = {
            s: {"train": len(sp["train_texts"]), "test": len(sp["test_texts"])}
            for s, sp in self.splits.items()
        }

    def compute(self, ctx, sae) -> dict:
        from atmpipe.eval import interval  # lazy (eval/metric.py)
        from atmpipe.eval.compute import probing, tpp

        per_set, reps, start = {}, {str(n): [] for n in N_VALUES}, time.perf_counter()
        for i, s in enumerate(self.sets):
            P = self.pooled[s]
            F = probing.sae_pooled(sae.sae, self.set_inputs(ctx, s))
            correct = tpp.tpp_correct(
                sae.sae,
                F["train"],
                F["test"],
                P["test"],
                P["train_labels"],
                P["test_labels"],
                self.probes[s],
                N_VALUES,
            )
            n_test = len(P["test_labels"])
            point = tpp.tpp_replicates(self.probes[s], correct, n_test, np.ones((1, n_test)))
            per_set[s] = {n: float(v[0]) for n, v in point.items()}
            boot = tpp.tpp_replicates(
                self.probes[s], correct, n_test, interval.bootstrap_weights(n_test, seed=i)
            )
            for n, r in boot.items():
                reps[n].append(r)
        return summarise_tpp(per_set, reps) | {"seconds": time.perf_counter() - start}

    def blocks(self, names, results, shared) -> list[tuple]:
        from atmpipe.eval.report import fmt  # lazy (eval/metric.py)

        tp = {n: results[n]["tpp"] for n in names if "tpp" in results[n]}
        sets = list(next(iter(tp.values()))["per_set"])
        text = (
            f"TPP (SAEBench's targeted probe perturbation) on {len(sets)} multi-class sets of the sae-probes "
            f"data ({', '.join(sets)}), averaged over sets; sizes per set {shared['sizes'].get('tpp')}. "
            "95% intervals: percentile bootstrap over each set's test texts (test sampling only; the probes are "
            "deterministic). MDD: the smallest difference between two SAEs separated at 95%."
        )
        header = [
            "SAE",
            *[f"TPP N={n}" for n in N_VALUES],
            "MDD N=20",
            "status",
            *[f"N=20 {s}" for s in sets],
        ]
        rows = [
            [
                n,
                *[
                    f"{fmt(t['tpp'][str(k)])} [{fmt(t['ci95_tpp'][str(k)][0])}, {fmt(t['ci95_tpp'][str(k)][1])}]"
                    for k in N_VALUES
                ],
                fmt(t["mdd_headline"]),
                t["status"] + (f": {t['reason']}" if t.get("reason") else ""),
                *[fmt(t["per_set"][s][str(HEADLINE_N)]) for s in sets],
            ]  # fmt: skip
            for n, t in tp.items()
        ]
        return [("h2", "Targeted probe perturbation (TPP)"), ("p", text), ("table", header, rows)]


def summarise_tpp(per_set: dict, reps: dict) -> dict:
    """Mean over sets per N, its percentile 95% interval and MDD; 'unresolved' where MDD > 0.1."""
    out = {"per_set": per_set, "tpp": {}, "ci95_tpp": {}, "mdd": {}, "n_sets": len(per_set)}
    for n, r in reps.items():
        out["tpp"][n] = float(np.mean([v[n] for v in per_set.values()]))
        lo, hi = np.percentile(np.mean(r, axis=0), [2.5, 97.5])
        out["ci95_tpp"][n] = [float(lo), float(hi)]
        out["mdd"][n] = float(np.sqrt(2) * (hi - lo) / 2)
    h = str(HEADLINE_N)
    out |= {"tpp_headline": out["tpp"][h], "ci95_tpp_headline": out["ci95_tpp"][h], "headline_n": HEADLINE_N}
    out |= {
        "half_width_headline": (out["ci95_tpp"][h][1] - out["ci95_tpp"][h][0]) / 2,
        "mdd_headline": out["mdd"][h],
    }
    out["status"] = "ok" if out["mdd_headline"] <= 0.1 else "unresolved"
    if out["status"] == "unresolved":
        out["reason"] = f"MDD {out['mdd_headline']:.2f} > 0.1 at N={HEADLINE_N}"
    return out
