"""Sparse probing on the sae-probes tasks as a plug-in (the computations are in `atmpipe.eval.probing`)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from atmpipe.errors import UserError
from atmpipe.eval import data
from atmpipe.eval.metric import Metric, option

if TYPE_CHECKING:
    import torch  # lazy (eval/metric.py)


@dataclass
class TextOptions:
    """Shared by the metrics that read labelled texts (probing and bias)."""

    probing_context: int = option(128, "Tokens per probing/bias text.")
    probing_data: str | None = option(None, "Directory of the sae-probes *.csv.zst files.")


@dataclass
class ProbingOptions(TextOptions):
    probing_tasks: str = option(",".join(data.TASKS), "Comma list of probing tasks (default all).")
    probing_train: int = option(128, "Training texts per probing task.")
    probing_test: int = option(64, "Test texts per probing task.")


class Probing(Metric):
    name = "probing"
    Options = ProbingOptions
    needs = frozenset({"lm"})
    rows = [
        ("sparse probing top-1 (mean over tasks)", "mean_sae_top_1", "probing"),
        ("sparse probing top-2", "mean_sae_top_2", None),
        ("sparse probing top-5", "mean_sae_top_5", None),
        ("sentiment top-1", "sentiment_sae_top_1", "sentiment"),
    ]

    def check(self) -> None:
        self.tasks = [t.strip() for t in self.opts.probing_tasks.split(",") if t.strip()]
        unknown = [t for t in self.tasks if t not in data.TASKS]
        if unknown or not self.tasks:
            raise UserError(
                f"unknown probing task {', '.join(unknown) or '(none)'}; known: {', '.join(data.TASKS)}"
            )

    def prepare(self, ctx) -> None:
        o = self.opts
        data_dir = Path(o.probing_data) if o.probing_data else None
        self.splits = {
            t: data.task_split(data.TASKS[t], o.probing_train, o.probing_test, ctx.seed, data_dir)
            for t in self.tasks
        }

    def collect(self, ctx) -> None:
        from atmpipe.eval import probing  # lazy (eval/metric.py)

        ctx.shared["probing_baselines"], self.task_data = {}, {}
        for t, sp in self.splits.items():
            texts = sp["train_texts"] + sp["test_texts"]
            key = {
                "task": t,
                "n_train": self.opts.probing_train,
                "n_test": self.opts.probing_test,
                "seed": ctx.seed,
            }
            got = text_inputs(ctx, f"probing-{t}", texts, self.opts.probing_context, key)
            n_tr = len(sp["train_texts"])
            td = {"train_labels": np.array(sp["train_labels"]), "test_labels": np.array(sp["test_labels"])}
            for part, idx in (("train", np.arange(n_tr)), ("test", np.arange(n_tr, len(texts)))):
                td[f"{part}_acts"], td[f"{part}_offsets"] = split_ragged(got["acts"], got["offsets"], idx)
            self.task_data[t] = td
            R = {k: probing.mean_pool(td[f"{k}_acts"], td[f"{k}_offsets"]) for k in ("train", "test")}
            ctx.shared["probing_baselines"][t] = probing.residual_baselines(
                R["train"], td["train_labels"], R["test"], td["test_labels"], seed=ctx.seed
            )
        ctx.shared["sizes"]["probing"] = {
            t: {"train": len(sp["train_texts"]), "test": len(sp["test_texts"])}
            for t, sp in self.splits.items()
        }

    def compute(self, ctx, sae) -> dict:
        from atmpipe.eval import probing  # lazy (eval/metric.py)

        per_task = {
            t: probing.sae_task_accuracies(sae.sae, td, seed=ctx.seed) for t, td in self.task_data.items()
        }
        return summarise_probing(per_task)

    def blocks(self, names, results, shared) -> list[tuple]:
        from atmpipe.eval.report import fmt, grouped_bars  # lazy (eval/metric.py)

        pr = {n: results[n]["probing"]["per_task"] for n in names if "probing" in results[n]}
        tasks = list(next(iter(pr.values())))
        base = shared["probing_baselines"]
        series = {n: [pr[n][t]["sae_top_1"] for t in tasks] for n in pr}
        series["residual top-1"] = [base[t]["resid_top_1"] for t in tasks]
        series["full residual"] = [base[t]["resid_full"] for t in tasks]
        png = grouped_bars(tasks, series, "test accuracy", "Sparse probing: top-1 latent vs baselines")
        header = ["task", "train/test", *[f"{n} k=1/2/5" for n in pr], "resid k=1/2/5", "full resid"]
        rows = []
        for t in tasks:
            sz = shared["sizes"]["probing"][t]
            rows.append(
                [
                    t,
                    f"{sz['train']}/{sz['test']}",
                    *["/".join(fmt(pr[n][t][f"sae_top_{k}"]) for k in (1, 2, 5)) for n in pr],
                    "/".join(fmt(base[t][f"resid_top_{k}"]) for k in (1, 2, 5)),
                    fmt(base[t]["resid_full"]),
                ]
            )
        return [
            ("h2", "Sparse probing per task"),
            ("img", "probing_tasks.png", "probing accuracy per task", png),
            ("table", header, rows),
        ]


def text_inputs(ctx, kind: str, texts: list[str], context: int, key: dict) -> dict:
    """Each text's residual activations (ragged: `acts` rows and `offsets`), cached per model and layer."""

    def compute():
        from atmpipe.eval import probing  # lazy (eval/metric.py)

        phase = ctx.phase(f"{kind} texts (LM)", len(texts))
        acts, offsets = probing.text_activations(
            ctx.lm, ctx.layer, texts, context, max(1, ctx.batch_size // 2), phase
        )
        return {"acts": acts, "offsets": offsets}, {}

    texts_sha = hashlib.sha256("\x00".join(texts).encode()).hexdigest()
    return ctx.cached(kind, key | {"context": context, "texts_sha256": texts_sha}, compute)[0]


def split_ragged(
    acts: torch.Tensor, offsets: torch.Tensor, idx: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    import torch  # lazy (eval/metric.py)

    rows = [acts[offsets[i] : offsets[i + 1]] for i in idx]
    new = torch.zeros(len(idx) + 1, dtype=torch.long)
    new[1:] = torch.cumsum(torch.tensor([r.shape[0] for r in rows]), 0)
    return torch.cat(rows), new


def summarise_probing(per_task: dict) -> dict:
    """Per-task accuracies plus their means over all tasks and over the sentiment tasks."""
    from atmpipe.eval import probing  # lazy (eval/metric.py)

    out = {"per_task": per_task}
    for k in probing.K_VALUES:
        key = f"sae_top_{k}"
        out[f"mean_{key}"] = float(np.mean([v[key] for v in per_task.values()]))
        senti = [v[key] for t, v in per_task.items() if data.TASKS[t].group == "sentiment"]
        if senti:
            out[f"sentiment_{key}"] = float(np.mean(senti))
    return out
