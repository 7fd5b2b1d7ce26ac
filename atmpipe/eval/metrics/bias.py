"""Spurious correlation removal (SCR) as a plug-in (the computations are in `atmpipe.eval.bias`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from atmpipe.errors import UserError
from atmpipe.eval import data
from atmpipe.eval.metric import Metric, option
from atmpipe.eval.metrics.probing import TextOptions, text_inputs


@dataclass
class BiasOptions(TextOptions):
    bias_occupations: str = option("politician,singer", "Target occupations A,B for SCR.")
    bias_people_per_cell: int = option(0, "Cap per (occupation, gender) cell; 0 = all.")  # all: ~750 people


class Bias(Metric):
    name = "bias"
    Options = BiasOptions
    needs = frozenset({"lm"})
    rows = [("SCR (bias) at headline N", "scr_headline", "bias")]

    def check(self) -> None:
        self.occupations = [o.strip() for o in self.opts.bias_occupations.split(",")]
        if len(self.occupations) != 2 or not set(self.occupations) <= set(data.OCCUPATIONS):
            known, got = ", ".join(data.OCCUPATIONS), self.opts.bias_occupations
            raise UserError(f"--bias-occupations needs two of {known}, got {got!r}")

    def prepare(self, ctx) -> None:
        from atmpipe.eval import bias  # lazy (eval/metric.py)

        self.bias_cfg = bias.BiasConfig(
            occupation_a=self.occupations[0],
            occupation_b=self.occupations[-1],
            seed=ctx.seed,
            people_per_cell=self.opts.bias_people_per_cell,
        )
        data_dir = Path(self.opts.probing_data) if self.opts.probing_data else None
        self.data = bias.scr_dataset(data.occupation_gender_table(data_dir), self.bias_cfg)

    def collect(self, ctx) -> None:
        key = {"occupations": self.occupations, "seed": ctx.seed, "per_cell": self.opts.bias_people_per_cell}
        got = text_inputs(ctx, "bias", self.data["texts"], self.opts.probing_context, key)
        self.inputs = {k: v for k, v in self.data.items() if k != "texts"} | got

    def compute(self, ctx, sae) -> dict:
        from atmpipe.eval import bias  # lazy (eval/metric.py)

        return bias.scr_metrics(sae.sae, self.inputs, self.bias_cfg)

    def blocks(self, names, results, shared) -> list[tuple]:
        from atmpipe.eval.report import fmt  # lazy (eval/metric.py)

        bi = {n: results[n]["bias"] for n in names if "bias" in results[n]}
        con = next(iter(bi.values())).get("construction", {})
        text = (
            "Bias in Bios is not available offline. Construction: Wikidata people from the "
            "sae-probes data, one occupation each (a person positive for two occupations is "
            "dropped), joined with the gender dataset on the same text. Target "
            f"{con.get('target')}, spurious {con.get('spurious')}; the training split is biased "
            f"(only {', '.join(con.get('biased_train_cells', []))}; {con.get('n_biased_train')} people), "
            f"the oracle and gender probes use {con.get('n_balanced_train')} balanced people, the test "
            f"has {con.get('n_test')} people balanced over all four cells (cell sizes "
            f"{con.get('cell_sizes')}). Latents are ranked by their effect on the gender probe and "
            "zero-ablated with the SAE error kept."
        )
        ns = sorted({int(k) for b in bi.values() for k in b.get("ablated_accuracy", {})})
        header = ["SAE", "A_base", "A_oracle", *[f"SCR N={n}" for n in ns], "status"]
        rows = [
            [
                n,
                fmt(b.get("a_base")),
                fmt(b.get("a_oracle")),
                *[fmt(b.get("scr", {}).get(str(k))) for k in ns],
                b.get("status", "") + (f": {b['reason']}" if b.get("reason") else ""),
            ]
            for n, b in bi.items()
        ]
        return [("h2", "Bias: spurious correlation removal"), ("p", text), ("table", header, rows)]
