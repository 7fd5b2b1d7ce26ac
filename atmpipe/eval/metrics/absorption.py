"""Feature absorption on the first-letter task as a plug-in (the computations are in
`atmpipe.eval.absorption`)."""

from __future__ import annotations

from dataclasses import dataclass

from atmpipe.eval.metric import Metric, option


@dataclass
class AbsorptionOptions:
    absorption_words_per_letter: int = option(80, "Words sampled per first letter.")
    # 2 measured best on gemma-3-270m: 0.76 probe accuracy
    absorption_icl: int = option(2, "In-context examples per absorption prompt.")
    absorption_f1_gate: float = option(0.6, "Letters need probe F1 above this.")
    absorption_min_letters: int = option(20, "Letters needed to report absorption.")


class Absorption(Metric):
    name = "absorption"
    Options = AbsorptionOptions
    needs = frozenset({"lm"})
    rows = [
        ("full absorption (mean over letters)", "mean_full_absorption", "absorption"),
        ("absorption fraction (mean over letters)", "mean_absorption_fraction", None),
        ("split features (mean main latents)", "mean_num_split_features", None),
        ("letters evaluated", "letters_evaluated", None),
    ]

    def collect(self, ctx) -> None:
        from atmpipe.eval import absorption

        self.acfg = absorption.AbsorptionConfig(
            words_per_letter=self.opts.absorption_words_per_letter,
            icl_examples=self.opts.absorption_icl,
            probe_f1_gate=self.opts.absorption_f1_gate,
            min_letters=self.opts.absorption_min_letters,
            seed=ctx.seed,
        )
        self.inputs = inputs = self.word_inputs(ctx)
        self.probe = absorption.ground_truth_probe(
            inputs["acts_train"], inputs["y_train"], inputs["acts_test"], inputs["y_test"], ctx.seed
        )
        ctx.shared["sizes"]["absorption"] = {
            "vocab_words": inputs["vocab_size"],
            "words": len(inputs["words"]),
            "dropped_prompts": inputs["dropped"],
        }

    def word_inputs(self, ctx) -> dict:
        """The words' residual activations and first letters, split into train and test (cached)."""
        acfg = self.acfg
        key = {
            "words_per_letter": acfg.words_per_letter,
            "icl": acfg.icl_examples,
            "template": acfg.template,
            "min_letters_word": acfg.min_word_letters,
            "test_fraction": acfg.test_fraction,
            "seed": acfg.seed,
        }

        def compute():
            import torch

            from atmpipe.eval import absorption

            ds = absorption.first_letter_dataset(ctx.lm.tokenizer, acfg)
            phase = ctx.phase("absorption prompts (LM)", len(ds["words"]))
            acts = absorption.word_activations(
                ctx.lm, ctx.layer, ds["input_ids"], ds["positions"], ctx.batch_size, phase
            )
            tensors = {
                "acts": acts,
                "labels": torch.from_numpy(ds["labels"]),
                "is_test": torch.from_numpy(ds["is_test"]),
            }
            return tensors, {"words": ds["words"], "vocab_size": ds["vocab_size"], "dropped": ds["dropped"]}

        tensors, extra = ctx.cached("absorption", key, compute)
        is_test = tensors["is_test"].numpy().astype(bool)
        acts, labels = tensors["acts"].numpy(), tensors["labels"].numpy()
        return {
            "acts_train": acts[~is_test],
            "y_train": labels[~is_test],
            "acts_test": acts[is_test],
            "y_test": labels[is_test],
            **extra,
        }

    def compute(self, ctx, sae) -> dict:
        from atmpipe.eval import absorption

        i = self.inputs
        return absorption.absorption_metrics(
            sae.sae, i["acts_train"], i["y_train"], i["acts_test"], i["y_test"], self.acfg, self.probe
        )

    def blocks(self, names, results, shared) -> list[tuple]:
        from atmpipe.eval.report import fmt, grouped_bars

        blocks: list[tuple] = [("h2", "Absorption per letter")]
        ab = {n: results[n]["absorption"] for n in names if "absorption" in results[n]}
        size = shared["sizes"].get("absorption", {})
        first = next(iter(ab.values()))
        blocks.append(
            (
                "p",
                f"First-letter task on {size.get('words')} words sampled by letter from "
                f"{size.get('vocab_words')} alphabetic tokens ({size.get('dropped_prompts')} prompts "
                f"dropped for a tokenisation merge), {first['n_words_train']} train / "
                f"{first['n_words_test']} test; ground-truth probe accuracy {fmt(first['probe_accuracy'])}, "
                f"{first['letters_passed']} of 26 letters above F1 {first['probe_f1_gate']} "
                f"(need {first['letters_required']}).",
            )
        )
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

        rows = [[c, *[both(n, c) for n in ab], fmt(first["probe_f1"][c])] for c in letters]
        blocks.append(("table", ["letter", *[f"{n} (fraction / full)" for n in ab], "probe F1"], rows))
        return blocks
