"""Spurious correlation removal (SAEBench SCR; the paper's 'bias detection' number).

Construction here (Bias in Bios is not available offline): Wikidata people from the sae-probes data, each
with one occupation and a gender, joined on the same text (`data.occupation_gender_table`). Target: occupation
A vs B; spurious attribute: gender. The training split is biased — only A-people of the gender A is more
often and B-people of the other — so a probe trained on it partly learns gender. Test: equal numbers of
all four (occupation, gender) cells.

Each text ends with the person's name (the sae-probes format), so a text is read at its last token, and only
its last `tail_chars` characters are kept: the LM call truncates on the right, and the whole passages
(~500 characters, 100+ tokens) lost the name at context 64, leaving gender undecodable (probe 0.6) and no
spurious signal to remove. Probes see the residual centred and divided by one scalar.

SCR (SAEBench's dir-1 score): rank latents by |Δmean(latent) between genders × ⟨decoder row, gender probe⟩|,
zero-ablate the top N keeping the SAE's error term, and re-measure the biased probe on the balanced test:
(A_ablated − A_base) / (A_oracle − A_base), A_oracle = a probe for the target trained on the balanced split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression

from atmpipe.eval.interval import bootstrap_weights


@dataclass
class BiasConfig:
    occupation_a: str = "politician"
    occupation_b: str = "singer"
    n_values: tuple[int, ...] = (2, 5, 10, 20, 50, 100, 500)  # SAEBench's
    headline_n: int = 20
    context: int = (
        128  # LM window for the tails (the bias plug-in reads it; --probing-context does not apply)
    )
    tail_chars: int = 160  # ~40 tokens: the name stays inside any context >= 64
    people_per_cell: int = 0  # cap on each (occupation, gender) cell before splitting; 0 = all
    min_gap: float = 0.02  # A_oracle − A_base below this: nothing to remove, SCR is not defined
    seed: int = 0


def scr_dataset(table: pd.DataFrame, cfg: BiasConfig) -> dict:
    """Texts with target (1 = occupation A) and spurious (1 = male) labels and the three splits' indices."""
    table = table[table.occupation.isin([cfg.occupation_a, cfg.occupation_b])]
    male_share = table.assign(m=table.gender == "male").groupby("occupation").m.mean()
    a_gender = (
        "male" if male_share.get(cfg.occupation_a, 0) >= male_share.get(cfg.occupation_b, 0) else "female"
    )
    b_gender = "female" if a_gender == "male" else "male"
    rng = np.random.default_rng(cfg.seed)
    cells = {}
    for occ in (cfg.occupation_a, cfg.occupation_b):
        for g in ("male", "female"):
            rows = table[(table.occupation == occ) & (table.gender == g)]
            cells[(occ, g)] = rows.iloc[rng.permutation(len(rows))[: cfg.people_per_cell or None]]
    aligned = [(cfg.occupation_a, a_gender), (cfg.occupation_b, b_gender)]
    off = [(cfg.occupation_a, b_gender), (cfg.occupation_b, a_gender)]
    n_test = min(len(c) for c in cells.values()) // 2
    n_balanced = max(0, min(len(cells[k]) for k in off) - n_test)
    n_biased = max(0, min(len(cells[k]) for k in aligned) - n_test - n_balanced)
    texts, target, spurious, table_rows = [], [], [], []
    splits = {"biased_train": [], "balanced_train": [], "test": []}
    for key, rows in cells.items():
        parts = [("test", n_test), ("balanced_train", n_balanced)] + (
            [("biased_train", n_biased)] if key in aligned else []
        )
        start = 0
        for split, n in parts:
            for row, text in zip(
                rows.index[start : start + n], rows.prompt.iloc[start : start + n], strict=True
            ):
                splits[split].append(len(texts))
                table_rows.append(row)
                texts.append(str(text)[-cfg.tail_chars :])
                target.append(int(key[0] == cfg.occupation_a))
                spurious.append(int(key[1] == "male"))
            start += n
    return {
        "texts": texts,
        "table_rows": np.array(table_rows, dtype=np.int64),  # each text's row label in `table`
        "target": np.array(target),
        "spurious": np.array(spurious),
        **{k: np.array(v, dtype=np.int64) for k, v in splits.items()},
        "construction": {
            "target": f"{cfg.occupation_a} (1) vs {cfg.occupation_b} (0)",
            "spurious": "gender (1 = male)",
            "read": f"residual at the last token of each text's last {cfg.tail_chars} characters (the name)",
            "biased_train_cells": [f"{o}/{g}" for o, g in aligned],
            "cell_sizes": {f"{o}/{g}": len(r) for (o, g), r in cells.items()},
            "n_biased_train": 2 * n_biased,
            "n_balanced_train": 4 * n_balanced,
            "n_test": 4 * n_test,
        },
    }


class CenteredScale:
    """Centre the residual and divide by one scalar, the RMS of its per-dimension spread.

    The residual carries a few huge constant offsets (one dimension averages ~7000 on gemma-3-270m against
    a typical spread of ~30), so scaling by the mean norm shrank every informative dimension ~200-fold and
    the probe's L2 penalty erased them. One scalar keeps probe weights in residual coordinates; a
    per-dimension scale would inflate the weights of near-constant dimensions.
    """

    def __init__(self, x: np.ndarray):
        self.mean = x.mean(0)
        self.scale = float(np.sqrt(x.var(0).mean())) or 1.0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) / self.scale


class ResidualProbe:
    """Logistic regression on centred residuals over one scalar scale: the weight stays in residual coordinates."""

    def __init__(self, X: np.ndarray, y: np.ndarray, seed: int = 0):
        self.prep = CenteredScale(X)
        self.clf = LogisticRegression(max_iter=2000, random_state=seed).fit(self.prep(X), y)

    def correct(self, X: np.ndarray, y: np.ndarray) -> np.ndarray:
        return (self.clf.predict(self.prep(X)) == y).astype(np.int8)

    def accuracy(self, X: np.ndarray, y: np.ndarray) -> float:
        return float(self.correct(X, y).mean())

    @property
    def weight(self) -> np.ndarray:
        return self.clf.coef_[0] / self.prep.scale


@torch.no_grad()
def scr_metrics(sae, data: dict, cfg: BiasConfig) -> dict:
    """SCR for each N in cfg.n_values; `data` = scr_dataset(...) plus per-token `acts` and `offsets`."""
    sizes = {k: len(data[k]) for k in ("biased_train", "balanced_train", "test")}
    if min(sizes.values()) < 8:
        return {
            "status": "insufficient",
            "reason": f"too few people for the SCR splits {sizes}",
            "construction": data.get("construction", {}),
        }
    if "resid" in data:  # each text's last-token residual, already read
        R = data["resid"].float()
    else:
        R = data["acts"][data["offsets"][1:] - 1].float()  # each text's last token: the end of the name
    F = sae.encode(R).float().cpu().numpy()
    R = R.numpy()
    y, s = data["target"], data["spurious"]
    bt, bal, test = data["biased_train"], data["balanced_train"], data["test"]
    biased = ResidualProbe(R[bt], y[bt], cfg.seed)
    oracle = ResidualProbe(R[bal], y[bal], cfg.seed)
    gender = ResidualProbe(R[bal], s[bal], cfg.seed)
    a_base, a_oracle = biased.accuracy(R[test], y[test]), oracle.accuracy(R[test], y[test])
    W_dec = sae.W_dec.detach().float().cpu().numpy()
    diff = F[bal][s[bal] == 1].mean(0) - F[bal][s[bal] == 0].mean(0)
    effects = np.abs(diff * (W_dec @ gender.weight))
    ranked = np.argsort(-effects, kind="stable")
    out = {
        "a_base": a_base,
        "a_oracle": a_oracle,
        "spurious_probe_accuracy": gender.accuracy(R[test], s[test]),
        "top_latents": [int(i) for i in ranked[: max(cfg.n_values)]],
        "construction": data.get("construction", {}),
    }
    gap = a_oracle - a_base
    scores, accs = {}, {}
    # Per test person, for the bootstrap over people (`scr_summary`); dropped before results.json.
    correct = {"base": biased.correct(R[test], y[test]), "oracle": oracle.correct(R[test], y[test])}
    out["_correct"] = correct
    for n in cfg.n_values:
        chosen = ranked[: min(n, int((effects > 0).sum()))]
        # Zero-ablating latents while keeping the error term removes exactly their decoded contribution.
        R_abl = R[test] - F[test][:, chosen] @ W_dec[chosen]
        correct[str(n)] = biased.correct(R_abl, y[test])
        accs[n] = float(correct[str(n)].mean())
        scores[n] = (accs[n] - a_base) / gap if gap >= cfg.min_gap else math.nan
    out["ablated_accuracy"] = {str(n): a for n, a in accs.items()}
    if gap < cfg.min_gap:
        return out | {
            "status": "undefined",
            "reason": f"the biased probe is already within {gap:.3f} of the oracle (A_base {a_base:.3f}, "
            f"A_oracle {a_oracle:.3f}): there is no spurious signal to remove",
        }
    return out | {
        "status": "ok",
        "scr": {str(n): v for n, v in scores.items()},
        "scr_headline": scores.get(cfg.headline_n, next(iter(scores.values()))),
        "headline_n": cfg.headline_n,
    }


def usable_pairs(table: pd.DataFrame, occupations: tuple[str, ...], min_cell: int) -> list[tuple[str, str]]:
    """Occupation pairs whose four (occupation, gender) cells each hold at least `min_cell` people."""
    cells = table.groupby(["occupation", "gender"]).size()
    ok = [o for o in occupations if all(cells.get((o, g), 0) >= min_cell for g in ("male", "female"))]
    return [(a, b) for i, a in enumerate(ok) for b in ok[i + 1 :]]


def scr_summary(pairs: dict[str, dict], n_values, headline_n: int, n_boot: int = 1000) -> dict:
    """SCR averaged over occupation pairs (as SAEBench averages over its class pairs), with a 95% interval.

    The interval is a percentile bootstrap over each pair's test people (pairs resampled independently, the
    same draw for A_base, A_oracle and A_ablated); it carries test sampling only (the probes are
    deterministic). `mdd`: the smallest difference between two SAEs' scores a two-sided 95% comparison can
    separate, 1.96·√2·se with se = half-width / 1.96.
    """
    ok = {k: p for k, p in pairs.items() if p.get("status") == "ok"}
    if not ok:
        return {"status": "undefined", "reason": "no occupation pair has a spurious signal to remove"}
    reps = {str(n): np.zeros(n_boot) for n in n_values}
    for i, p in enumerate(ok.values()):
        c = p["_correct"]
        W = bootstrap_weights(len(c["base"]), n_boot, seed=i)
        acc = {k: W @ v / W.sum(1) for k, v in c.items()}
        for n in reps:
            with np.errstate(divide="ignore", invalid="ignore"):
                reps[n] += (acc[n] - acc["base"]) / (acc["oracle"] - acc["base"]) / len(ok)
    out = {
        "n_pairs": len(ok),
        "pairs_used": list(ok),
        "n_test": int(sum(p["construction"]["n_test"] for p in ok.values())),
    }
    out["a_base"] = float(np.mean([p["a_base"] for p in ok.values()]))
    out["a_oracle"] = float(np.mean([p["a_oracle"] for p in ok.values()]))
    out["scr"], out["ci95_scr"], out["mdd"] = {}, {}, {}
    for n, r in reps.items():
        out["scr"][n] = float(np.mean([p["scr"][n] for p in ok.values()]))
        r = np.where(np.isfinite(r), r, np.nan)  # a replicate where a pair's A_oracle = A_base has no SCR
        lo, hi = np.nanpercentile(r, [2.5, 97.5])
        out["ci95_scr"][n] = [float(lo), float(hi)]
        out["mdd"][n] = float(np.sqrt(2) * (hi - lo) / 2)
    h = str(headline_n)
    out |= {"scr_headline": out["scr"][h], "ci95_scr_headline": out["ci95_scr"][h], "headline_n": headline_n}
    out["half_width_headline"] = (out["ci95_scr"][h][1] - out["ci95_scr"][h][0]) / 2
    return out | {"mdd_headline": out["mdd"][h]}
