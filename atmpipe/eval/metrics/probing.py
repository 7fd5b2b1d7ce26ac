"""Sparse probing on the sae-probes tasks as a plug-in (the computations are in `atmpipe.eval.compute.probing`)."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from atmpipe.errors import UserError
from atmpipe.eval import data, interval
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
    probing_tasks: str = option(",".join(data.TASKS), "Comma list of probing tasks (default all 51).")
    probing_train: int = option(1000, "Training texts per probing task (at most; balanced).")
    probing_test: int = option(1000, "Test texts per probing task (at most half of the set; balanced).")


class Probing(Metric):
    name = "probing"
    Options = ProbingOptions
    needs = frozenset({"lm"})
    paper = {"probing": "ATM 0.7161", "sentiment": "ATM 0.853"}
    rows = [
        ("sparse probing top-1 (mean over tasks)", "mean_sae_top_1", "probing"),
        ("sparse probing top-5", "mean_sae_top_5", None),
        ("sparse probing top-20", "mean_sae_top_20", None),
        ("sentiment top-1 (mean over sentiment sets)", "sentiment_sae_top_1", "sentiment"),
        ("tasks where SAE top-1 beats residual top-1", "share_beats_resid_top_1", None),
        ("tasks where SAE top-5 beats residual top-5", "share_beats_resid_top_5", None),
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

    def task_inputs(self, ctx, t: str) -> dict:
        """Task t's ragged train/test residuals and labels, read from (or first written to) the cache."""
        sp = self.splits[t]
        key = {
            "task": t,
            "n_train": self.opts.probing_train,
            "n_test": self.opts.probing_test,
            "seed": ctx.seed,
        }
        return split_inputs(ctx, f"probing-{t}", sp, self.opts.probing_context, key)

    def collect(self, ctx) -> None:
        """Every task's LM activations into the cache, and the SAE-independent residual baselines."""
        from atmpipe.eval.compute import probing  # lazy (eval/metric.py)

        self.base_correct, base, start = {}, {}, time.perf_counter()
        phase = ctx.phase("probing · residual baselines", len(self.splits))
        for t in self.splits:
            td = self.task_inputs(ctx, t)  # not kept: each SAE reads its task back from the cache
            R = {k: probing.mean_pool(td[f"{k}_acts"], td[f"{k}_offsets"]) for k in ("train", "test")}
            self.base_correct[t] = probing.residual_correct(
                R["train"], td["train_labels"], R["test"], td["test_labels"]
            )
            seed = list(data.TASKS).index(t)  # a task's bootstrap seed, the same for every method
            base[t] = {m: interval.task_interval(v, seed=seed) for m, v in self.base_correct[t].items()}
            phase()
        ctx.shared["probing_baselines"] = base | {"groups": group_means(self.base_correct)}
        ctx.shared["sizes"]["probing"] = {
            t: {"train": len(sp["train_texts"]), "test": len(sp["test_texts"]), "group": data.TASKS[t].group}
            for t, sp in self.splits.items()
        }
        ctx.shared["probing_protocol"] = PROTOCOL
        ctx.shared.setdefault("seconds", {})["probing_collect"] = time.perf_counter() - start  # LM or cache

    def compute(self, ctx, sae) -> dict:
        from atmpipe.eval.compute import probing  # lazy (eval/metric.py)

        start = time.perf_counter()
        correct = {t: probing.sae_task_correct(sae.sae, self.task_inputs(ctx, t)) for t in self.splits}
        return summarise_probing(correct, self.base_correct) | {"seconds": time.perf_counter() - start}

    def blocks(self, names, results, shared) -> list[tuple]:
        return probing_blocks(names, results, shared)


PROTOCOL = (
    "SAEBench sparse probing: latents mean-pooled over each text's tokens (BOS/pad dropped), the top-k "
    "latents by |mean(positive) − mean(negative)| on the training texts, a standardised logistic regression "
    "on them. Each of 3 probe seeds resamples the training texts (class-stratified bootstrap). Intervals: 95%, "
    "normal, from a bootstrap over test texts (1000 replicates) and the spread over the probe seeds (sd/√3), "
    "added in quadrature; tasks are fixed, not resampled."
)


def split_inputs(ctx, kind: str, split: dict, context: int, key: dict) -> dict:
    """A labelled split's ragged train/test residuals and labels, read from (or first written to) the cache."""
    texts = split["train_texts"] + split["test_texts"]
    got = text_inputs(ctx, kind, texts, context, key)
    n_tr = len(split["train_texts"])
    out = {"train_labels": np.array(split["train_labels"]), "test_labels": np.array(split["test_labels"])}
    for part, idx in (("train", np.arange(n_tr)), ("test", np.arange(n_tr, len(texts)))):
        out[f"{part}_acts"], out[f"{part}_offsets"] = split_ragged(got["acts"], got["offsets"], idx)
    return out


def text_inputs(ctx, kind: str, texts: list[str], context: int, key: dict) -> dict:
    """Each text's residual activations (ragged: `acts` rows and `offsets`), cached per model and layer."""

    def compute():
        from atmpipe.eval.compute import probing  # lazy (eval/metric.py)

        phase = ctx.phase(f"{kind} texts (LM)", len(texts))
        acts, offsets = probing.text_activations(
            ctx.lm, ctx.layer, texts, context, max(1, ctx.batch_size // 2), phase
        )
        # float16 halves the cache (51 tasks × 2000 texts is ~6M tokens); readers widen to float32.
        return {"acts": acts.half(), "offsets": offsets}, {}

    texts_sha = hashlib.sha256("\x00".join(texts).encode()).hexdigest()
    config = key | {"context": context, "texts_sha256": texts_sha, "dtype": "float16"}
    return ctx.cached(kind, config, compute)[0]


def split_ragged(
    acts: torch.Tensor, offsets: torch.Tensor, idx: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    import torch  # lazy (eval/metric.py)

    rows = [acts[offsets[i] : offsets[i + 1]] for i in idx]
    new = torch.zeros(len(idx) + 1, dtype=torch.long)
    new[1:] = torch.cumsum(torch.tensor([r.shape[0] for r in rows]), 0)
    return torch.cat(rows), new


def group_means(correct: dict[str, dict[str, np.ndarray]]) -> dict:
    """Mean over all tasks and over each family of every method's accuracy, with 95% intervals.

    `correct[task][method]` is that method's [seeds, test texts] correctness; the bootstrap seed of a task is
    its position in `data.TASKS`, so two methods on one task are resampled alike.
    """
    order = {t: i for i, t in enumerate(data.TASKS)}
    groups = {"all": list(correct)} | {
        g: [t for t in correct if data.TASKS[t].group == g] for g in data.GROUPS
    }
    out = {}
    for g, tasks in groups.items():
        if not tasks:
            continue
        methods = next(iter(correct.values())).keys()
        seeds = [order[t] for t in tasks]
        out[g] = {m: interval.mean_interval([correct[t][m] for t in tasks], seeds) for m in methods}
    return out


def summarise_probing(correct: dict, base_correct: dict) -> dict:
    """Per task and per family, each k's accuracy with its interval; the share of tasks beating the residual."""
    from atmpipe.eval.compute import probing  # lazy (eval/metric.py)

    order = {t: i for i, t in enumerate(data.TASKS)}
    per_task = {
        t: {m: interval.task_interval(v, seed=order[t]) for m, v in c.items()} for t, c in correct.items()
    }
    groups = group_means(correct)
    out = {"per_task": per_task, "groups": groups}
    for k in probing.K_VALUES:
        key = f"sae_top_{k}"
        for g, name in (("all", "mean"), ("sentiment", "sentiment")):
            if g in groups:
                out[f"{name}_{key}"] = groups[g][key]["mean"]
                ci_key = f"ci95_{key}" if g == "all" else f"ci95_{name}_{key}"  # where report.cell looks
                out[ci_key] = [
                    groups[g][key]["lo"],
                    groups[g][key]["hi"],
                ]
        out |= beats_baseline(correct, base_correct, k, order)
    return out


def beats_baseline(correct: dict, base_correct: dict, k: int, order: dict) -> dict:
    """Share of tasks where the SAE's top-k probe beats the top-k residual dimensions: by the point estimate,
    and with the paired difference's 95% interval above 0."""
    diffs = {
        t: interval.task_interval(
            correct[t][f"sae_top_{k}"].astype(float) - base_correct[t][f"resid_top_{k}"], seed=order[t]
        )
        for t in correct
    }
    n = len(diffs)
    return {
        f"share_beats_resid_top_{k}": sum(d["mean"] > 0 for d in diffs.values()) / n,
        f"share_beats_resid_top_{k}_separated": sum(d["lo"] > 0 for d in diffs.values()) / n,
    }


def pm(iv: dict | None) -> str:
    """'0.712 ± 0.011' from an interval dict."""
    return "—" if iv is None else f"{iv['mean']:.3f} ± {iv['half_width']:.3f}"


def probing_blocks(names: list[str], results: dict, shared: dict) -> list[tuple]:
    from atmpipe.eval.compute.probing import K_VALUES  # lazy (eval/metric.py)
    from atmpipe.eval.report import fmt, grouped_bars  # lazy (eval/metric.py)

    pr = {n: results[n]["probing"] for n in names if "probing" in results[n]}
    base, sizes = shared["probing_baselines"], shared["sizes"]["probing"]
    tasks = list(sizes)
    methods = {n: p["groups"] for n, p in pr.items()}
    rows = []
    for n, g in methods.items():
        rows.append([n, *[pm(g["all"].get(f"sae_top_{k}")) for k in K_VALUES], pm(g.get("sentiment", {}).get("sae_top_1")),
                     *[f"{fmt(pr[n][f'share_beats_resid_top_{k}'])} ({fmt(pr[n][f'share_beats_resid_top_{k}_separated'])})" for k in (1, 5)]])  # fmt: skip
    bg = base["groups"]
    rows.append(["residual dims (baseline)", *[pm(bg["all"][f"resid_top_{k}"]) for k in K_VALUES],
                 pm(bg.get("sentiment", {}).get("resid_top_1")), "", ""])  # fmt: skip
    rows.append(["full residual (baseline)", pm(bg["all"]["resid_full"]), "", "", "", "",
                 pm(bg.get("sentiment", {}).get("resid_full")), "", ""])  # fmt: skip
    header = ["method", *[f"k={k}" for k in K_VALUES], "sentiment k=1", "beats resid k=1", "beats resid k=5"]
    fam_header = ["family (tasks)", *[f"{n} k=1" for n in methods], "resid k=1", "full resid"]
    fam_rows = [
        [
            f"{g} ({bg[g]['resid_full']['n_tasks']})",
            *[pm(methods[n][g]["sae_top_1"]) for n in methods],
            pm(bg[g]["resid_top_1"]),
            pm(bg[g]["resid_full"]),
        ]  # fmt: skip
        for g in bg
        if g != "all"
    ]
    task_header = [
        "task",
        "family",
        "train/test",
        *[f"{n} k=1 / k=5" for n in pr],
        "resid k=1 / k=5",
        "full resid",
    ]
    task_rows = [
        [
            t,
            sizes[t]["group"],
            f"{sizes[t]['train']}/{sizes[t]['test']}",
            *[
                f"{pm(pr[n]['per_task'][t]['sae_top_1'])} / {pm(pr[n]['per_task'][t]['sae_top_5'])}"
                for n in pr
            ],
            f"{pm(base[t]['resid_top_1'])} / {pm(base[t]['resid_top_5'])}",
            pm(base[t]["resid_full"]),
        ]  # fmt: skip
        for t in tasks
    ]
    series = {n: [pr[n]["per_task"][t]["sae_top_1"]["mean"] for t in tasks] for n in pr}
    series["residual top-1"] = [base[t]["resid_top_1"]["mean"] for t in tasks]
    series["full residual"] = [base[t]["resid_full"]["mean"] for t in tasks]
    png = grouped_bars(tasks, series, "test accuracy", "Sparse probing: top-1 latent vs baselines")
    share = (
        "'beats resid k': share of tasks where the SAE's top-k probe scores above the top-k residual "
        "dimensions (in brackets: with the paired difference's 95% interval above 0)."
    )
    return [
        ("h2", "Sparse probing"),
        (
            "p",
            f"{len(tasks)} binary tasks of the sae-probes data. {shared.get('probing_protocol', '')} {share}",
        ),
        ("table", header, rows),
        ("h2", "Sparse probing per family"),
        ("table", fam_header, fam_rows),
        ("h2", "Sparse probing per task"),
        ("img", "probing_tasks.png", "probing accuracy per task", png),
        ("table", task_header, task_rows),
    ]
