"""Spurious correlation removal (SCR) as a plug-in (the computations are in `atmpipe.eval.compute.bias`)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from atmpipe.errors import UserError
from atmpipe.eval import data
from atmpipe.eval.metric import Metric, option
from atmpipe.eval.metrics.probing import TextOptions, text_inputs


@dataclass
class BiasOptions(TextOptions):
    bias_occupations: str = option("all", "'all' (every pair with --bias-min-cell people a cell) or A,B.")
    bias_people_per_cell: int = option(0, "Cap per (occupation, gender) cell; 0 = all.")  # all: 761 people
    bias_min_cell: int = option(20, "Fewest people an (occupation, gender) cell needs for its pairs.")


class Bias(Metric):
    name = "bias"
    Options = BiasOptions
    needs = frozenset({"lm"})
    paper = {"bias": "ATM 0.796"}
    rows = [("SCR (bias) at N=20, mean over occupation pairs", "scr_headline", "bias")]

    def check(self) -> None:
        spec = self.opts.bias_occupations.strip()
        self.occupations = None if spec == "all" else [o.strip() for o in spec.split(",")]
        if self.occupations is not None and (
            len(self.occupations) != 2 or not set(self.occupations) <= set(data.OCCUPATIONS)
        ):
            known, got = ", ".join(data.OCCUPATIONS), self.opts.bias_occupations
            raise UserError(f"--bias-occupations needs 'all' or two of {known}, got {got!r}")

    def prepare(self, ctx) -> None:
        from atmpipe.eval.compute import bias  # lazy (eval/metric.py)

        data_dir = Path(self.opts.probing_data) if self.opts.probing_data else None
        self.table = data.occupation_gender_table(data_dir)
        pairs = (
            bias.usable_pairs(self.table, data.OCCUPATIONS, self.opts.bias_min_cell)
            if self.occupations is None
            else [tuple(self.occupations)]
        )
        self.cfg = {
            f"{a}/{b}": bias.BiasConfig(
                occupation_a=a, occupation_b=b, seed=ctx.seed, people_per_cell=self.opts.bias_people_per_cell
            )
            for a, b in pairs
        }
        self.pairs = {k: bias.scr_dataset(self.table, c) for k, c in self.cfg.items()}

    def collect(self, ctx) -> None:
        """Every person's last-token residual, read once and shared by all pairs and SAEs."""
        start = time.perf_counter()
        from atmpipe.eval.compute.bias import BiasConfig  # lazy (eval/metric.py)

        cfg = BiasConfig()  # the tail (~40 tokens) fits its context: --probing-context does not apply
        texts = [str(t)[-cfg.tail_chars :] for t in self.table.prompt]
        key = {"table": "occupation_gender", "tail_chars": cfg.tail_chars}
        got = text_inputs(ctx, "bias", texts, cfg.context, key)
        self.resid = got["acts"][got["offsets"][1:] - 1].float()
        pos = {label: i for i, label in enumerate(self.table.index)}
        for d in self.pairs.values():
            d["resid"] = self.resid[[pos[r] for r in d["table_rows"]]]
        ctx.shared["sizes"]["bias"] = {k: d["construction"] for k, d in self.pairs.items()}
        ctx.shared.setdefault("seconds", {})["bias_collect"] = time.perf_counter() - start

    def compute(self, ctx, sae) -> dict:
        from atmpipe.eval.compute import bias  # lazy (eval/metric.py)

        start = time.perf_counter()
        per_pair = {k: bias.scr_metrics(sae.sae, d, self.cfg[k]) for k, d in self.pairs.items()}
        cfg = next(iter(self.cfg.values()), bias.BiasConfig())
        out = bias.scr_summary(per_pair, cfg.n_values, cfg.headline_n)
        if out.get("status") is None and out["mdd_headline"] > 0.1:
            out["status"] = "unresolved"
            out["reason"] = (
                f"the smallest difference two SAEs' SCR can be told apart by is {out['mdd_headline']:.2f} "
                "(95%), more than 0.1: the shipped data cannot decide SCR"
            )
        out.setdefault("status", "ok")
        out["per_pair"] = {k: {n: v for n, v in p.items() if n != "_correct"} for k, p in per_pair.items()}
        return out | {"seconds": time.perf_counter() - start}

    def blocks(self, names, results, shared) -> list[tuple]:
        from atmpipe.eval.report import fmt  # lazy (eval/metric.py)

        bi = {n: results[n]["bias"] for n in names if "bias" in results[n]}
        some = next(iter(bi.values()))
        text = (
            "Bias in Bios is not available offline. Construction: Wikidata people from the sae-probes data, "
            "one occupation each (a person positive for two occupations is dropped), joined with the gender "
            "dataset on the same text; every occupation pair whose four (occupation, gender) cells hold enough "
            f"people: {', '.join(some.get('per_pair', {}))}. Per pair the training split is biased (occupation "
            "A only with the gender it has more often, B with the other), the oracle and gender probes use a "
            "balanced split, the test is balanced over all four cells. Latents are ranked by their effect on "
            "the gender probe and zero-ablated with the SAE error kept. SCR is averaged over the pairs; its "
            "95% interval is a bootstrap over each pair's test people (test sampling only); MDD is the "
            "smallest difference between two SAEs it separates at 95%."
        )
        ns = sorted({int(k) for b in bi.values() for k in b.get("scr", {})})
        header = [
            "SAE",
            "pairs",
            "n test",
            "A_base",
            "A_oracle",
            *[f"SCR N={n}" for n in ns],
            "MDD N=20",
            "status",
        ]
        rows = [
            [
                n,
                fmt(b.get("n_pairs")),
                fmt(b.get("n_test")),
                fmt(b.get("a_base")),
                fmt(b.get("a_oracle")),
                *[ci_cell(b, str(k)) for k in ns],
                fmt(b.get("mdd_headline")),
                b.get("status", "") + (f": {b['reason']}" if b.get("reason") else ""),
            ]
            for n, b in bi.items()
        ]
        return [("h2", "Bias: spurious correlation removal"), ("p", text), ("table", header, rows)]


def ci_cell(b: dict, n: str) -> str:
    from atmpipe.eval.report import fmt  # lazy (eval/metric.py)

    if n not in b.get("scr", {}):
        return "—"
    lo, hi = b["ci95_scr"][n]
    return f"{fmt(b['scr'][n])} [{fmt(lo)}, {fmt(hi)}]"
