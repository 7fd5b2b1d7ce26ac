"""Feature absorption on the first-letter task, SAEBench 0.6's protocol, as a plug-in (the computations are in
`atmpipe.eval.compute.absorption`; the definitions in docs/metrics.md)."""

from __future__ import annotations

from dataclasses import dataclass

from atmpipe.eval.compute.absorption_config import AbsorptionConfig
from atmpipe.eval.metric import Metric, option

PROTOCOL = AbsorptionConfig()  # the defaults below are the protocol's own (SAEBench 0.6), declared there


@dataclass
class AbsorptionOptions:
    absorption_sample_words: int = option(
        4000, "Absorption words sampled from the vocabulary (0 = all, SAEBench's full protocol)."
    )
    absorption_min_words_per_letter: int = option(100, "Per-letter floor on that sample.")
    absorption_sample_seed: int = option(
        0, "Seed of that sample (--seed varies split, examples and probes over the same words)."
    )
    absorption_icl: int = option(PROTOCOL.icl_examples, "In-context examples per absorption prompt.")
    absorption_f1_gate: float = option(PROTOCOL.probe_f1_gate, "Letters need probe F1 above this.")
    absorption_min_letters: int = option(PROTOCOL.min_letters, "Letters needed to report absorption.")


class Absorption(Metric):
    name = "absorption"
    Options = AbsorptionOptions
    needs = frozenset({"lm"})
    paper = {"absorption": "ATM 0.0068 · TopK 0.1402 · JumpReLU 0.0114"}
    rows = [
        ("full absorption (SAEBench protocol; 95% CI)", "mean_full_absorption", "absorption"),
        ("absorption fraction (SAEBench protocol; 95% CI)", "mean_absorption_fraction", None),
        ("split features (mean main latents)", "mean_num_split_features", None),
        ("letters evaluated", "letters_evaluated", None),
    ]

    def collect(self, ctx) -> None:
        from atmpipe.eval.compute import absorption  # lazy (eval/metric.py)

        self.acfg = acfg = absorption.AbsorptionConfig(
            sample_words=self.opts.absorption_sample_words,
            min_words_per_letter=self.opts.absorption_min_words_per_letter,
            sample_seed=self.opts.absorption_sample_seed,
            icl_examples=self.opts.absorption_icl,
            probe_f1_gate=self.opts.absorption_f1_gate,
            min_letters=self.opts.absorption_min_letters,
            seed=ctx.seed,
        )
        self.task = task = self.word_inputs(ctx)
        self.probe = absorption.ground_truth_probe(
            task["x_train"], task["y_train"], task["x_test"], task["y_test"], acfg
        )
        ctx.shared["absorption"] = summary(task, self.probe, acfg)

    def word_inputs(self, ctx) -> dict:
        """Residuals and first letters of the train, test and scoring prompts (cached per model and layer)."""
        from atmpipe.eval.compute import absorption  # lazy (eval/metric.py)

        acfg = self.acfg
        key = {
            "protocol": absorption.PROTOCOL,
            "sample_words": acfg.sample_words,
            "min_words_per_letter": acfg.min_words_per_letter,
            "sample_seed": acfg.sample_seed,
            "icl": acfg.icl_examples,
            "template": acfg.template,
            "train_fraction": acfg.train_fraction,
            "seed": acfg.seed,
        }

        def compute():
            import torch  # lazy (eval/metric.py)

            task = absorption.first_letter_task(ctx.lm.tokenizer, acfg)
            parts = ("train", "test", "score")
            phase = ctx.phase("absorption prompts (LM)", sum(len(task[k]["words"]) for k in parts))
            tensors = {}
            for k in parts:
                tensors[f"x_{k}"] = absorption.word_activations(
                    ctx.lm, ctx.layer, task[k]["input_ids"], task[k]["positions"], ctx.batch_size, phase
                )
                tensors[f"y_{k}"] = torch.from_numpy(task[k]["labels"])
            extra = {k: task[k] for k in ("vocab_size", "n_sampled", "sample_sha256", "dropped")}
            return tensors, extra | {
                "words_train": task["train"]["words"],
                "words_test": task["test"]["words"],
            }

        tensors, extra = ctx.cached("absorption", key, compute)
        return {k: v.numpy() for k, v in tensors.items()} | extra

    def compute(self, ctx, sae) -> dict:
        from atmpipe.eval.compute import absorption  # lazy (eval/metric.py)

        return absorption.absorption_metrics(sae.sae, self.task, self.probe, self.acfg)

    def blocks(self, names, results, shared) -> list[tuple]:
        from atmpipe.eval.report import fmt, grouped_bars  # lazy (eval/metric.py)

        blocks: list[tuple] = [
            ("h2", "Absorption per letter"),
            ("p", paragraph(shared.get("absorption", {}))),
        ]
        ab = {n: results[n]["absorption"] for n in names if "absorption" in results[n]}
        for n, a in ab.items():
            if a.get("status") != "ok":
                blocks.append(("p", f"{n}: not computed — {a.get('reason')}"))
        letters = sorted({c for a in ab.values() for c in a.get("per_letter", {})})
        if not letters:
            return blocks

        def letter(n, c):
            return ab[n].get("per_letter", {}).get(c, {})

        series = {n: [letter(n, c).get("full_absorption", 0.0) for c in letters] for n in ab}
        png = grouped_bars(letters, series, "full-absorption rate", "Full absorption per letter")
        blocks.append(("img", "absorption_letters.png", "full absorption per letter", png))

        def both(n, c):
            return (
                fmt(letter(n, c).get("absorption_fraction"))
                + " / "
                + fmt(letter(n, c).get("full_absorption"))
            )

        probe_f1 = shared.get("absorption", {}).get("probe_f1", {})
        rows = [[c, *[both(n, c) for n in ab], fmt(probe_f1.get(c))] for c in letters]
        blocks.append(("table", ["letter", *[f"{n} (fraction / full)" for n in ab], "probe F1"], rows))
        return blocks


def summary(task: dict, probe: dict, acfg) -> dict:
    """What the absorption numbers were measured on: protocol, word sample, split and probe quality."""
    from atmpipe.eval.compute import absorption  # lazy (eval/metric.py)

    letters = absorption.LETTERS
    whole = acfg.sample_words <= 0 or task["n_sampled"] == task["vocab_size"]
    kind = "whole vocabulary" if whole else "uniform random (natural letter frequencies)"
    if not whole and acfg.min_words_per_letter:
        kind += f", floor {acfg.min_words_per_letter} a letter"
    return {
        "protocol": absorption.PROTOCOL,
        "vocab_words": task["vocab_size"],
        "sample": {
            "words": task["n_sampled"],
            "requested": acfg.sample_words,
            "min_words_per_letter": acfg.min_words_per_letter,
            "seed": acfg.sample_seed,
            "kind": kind,
            "sha256": task["sample_sha256"],
        },
        "seed": acfg.seed,
        "dropped_words": task["dropped"],
        "n_words_train": int(len(task["y_train"])),
        "n_words_test": int(len(task["y_test"])),
        "test_words_per_letter": {c: int((task["y_test"] == i).sum()) for i, c in enumerate(letters)},
        "probe_f1": {c: float(probe["f1"][i]) for i, c in enumerate(letters)},
        "probe_f1_gate": acfg.probe_f1_gate,
        "letters_passed": int((probe["f1"] > acfg.probe_f1_gate).sum()),
        "letters_required": acfg.min_letters,
        "icl_examples": acfg.icl_examples,
        "bootstrap": acfg.bootstrap,
    }


def paragraph(a: dict) -> str:
    """Protocol, word sample and probe quality, said beside the absorption numbers."""
    sample = a.get("sample", {})
    return (
        f"Protocol {a.get('protocol')} (SAEBench 0.6's absorption eval step by step; docs/metrics.md): "
        f"{sample.get('words')} words ({sample.get('kind')}, sample seed {sample.get('seed')}) of "
        f"{a.get('vocab_words')} alphabetic vocabulary tokens, {a.get('n_words_train')} train / "
        f"{a.get('n_words_test')} test ({a.get('dropped_words')} dropped: no single word position), "
        f"{a.get('icl_examples')} in-context examples, seed {a.get('seed')}; "
        f"{a.get('letters_passed')} of 26 letters have ground-truth probe F1 > {a.get('probe_f1_gate')} "
        f"(need {a.get('letters_required')}). "
        f"Intervals: 95% bootstrap over the scored words ({a.get('bootstrap')} resamples, letters fixed); "
        "they leave out the probes' own randomness."
    )
