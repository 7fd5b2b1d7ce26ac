"""The per-letter absorption record the browser shows: letter → main latents, absorbing latents, words.

Read from an `atmpipe eval` results.json (per SAE, `results[name]["absorption"]["per_letter"][letter]`
with `main_latents` and, where the eval records it, `absorbers`: [{"latent": j, "words": [...]}]), or
computed on request with the absorption metric's own public functions (same probe, same main latents,
same absorber rule), whose LM activations come from the eval's cache when `atmpipe eval` ran first.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from atmpipe.errors import UserError

WORD_LATENTS = 3  # latents listed per absorption word in the side-by-side view


@dataclass
class LetterRecord:
    main: list[int]
    absorbers: dict[int, list[str]] = field(default_factory=dict)  # absorbing latent → words it absorbed
    absorption_fraction: float | None = None
    absorbers_recorded: bool = True  # False: the eval result names main latents only

    def to_json(self) -> dict:
        return {
            "main": self.main,
            "absorbers": [
                [j, words] for j, words in sorted(self.absorbers.items(), key=lambda t: -len(t[1]))
            ],
            "fraction": self.absorption_fraction,
            "absorbers_recorded": self.absorbers_recorded,
        }


def from_eval_results(path: Path, sae_name: str) -> dict[str, LetterRecord] | None:
    """The SAE's per-letter records in an eval results.json, or None if it holds no absorption for it."""
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(
            f"cannot read eval result {path} ({e}); pass a results.json written by `atmpipe eval`"
        ) from None
    absorption = (payload.get("results", {}).get(sae_name) or {}).get("absorption") or {}
    per_letter = absorption.get("per_letter")
    if not isinstance(per_letter, dict):
        return None
    records = {}
    for letter, row in per_letter.items():
        absorbers = row.get("absorbers")
        records[letter] = LetterRecord(
            main=[int(j) for j in row.get("main_latents", [])],
            absorbers={int(a["latent"]): list(a["words"]) for a in absorbers or []},
            absorption_fraction=row.get("absorption_fraction"),
            absorbers_recorded=absorbers is not None,
        )
    return records


def absorbing_latents(f: np.ndarray, cos: np.ndarray, main: list[int], cfg) -> list[int]:
    """The latents that took a word from its letter's main latents: the absorption metric's candidates
    (not main, decoder cosine with the probe ≥ absorber_cos, positive projection), largest first."""
    proj = f * cos
    candidates = np.ones(len(f), dtype=bool)
    candidates[main] = False
    candidates &= (cos >= cfg.absorber_cos) & (proj > 0)
    idx = np.flatnonzero(candidates)
    return idx[np.argsort(-proj[idx], kind="stable")][: cfg.max_absorbers].tolist()


def compute(sae, task: dict, probe: dict, acfg) -> dict[str, LetterRecord]:
    """Per-letter records for one SAE from the absorption metric's task (its `Absorption.task`): the same
    ranking, main latents, scored words and per-word rule as `absorption_metrics`."""
    from atmpipe.eval.absorption import (
        LETTERS,
        encode_all,
        latent_ranking,
        main_latents,
        probe_cosines,
        word_absorption,
    )

    F_train, F_test = encode_all(sae, task["x_train"]), encode_all(sae, task["x_test"])
    F_score = encode_all(sae, task["x_score"])
    ranking = latent_ranking(F_train, task["y_train"], acfg)
    y_train, y_test, words = task["y_train"], task["y_test"], task["words_test"]
    records = {}
    for c in range(26):
        if not probe["f1"][c] > acfg.probe_f1_gate:
            continue
        main, _ = main_latents(F_train, F_test, y_train == c, y_test == c, ranking[c], acfg)
        direction, cos = probe_cosines(probe, c, sae.W_dec)
        true_pos = np.flatnonzero((y_test == c) & (probe["test_logits"][:, c] > 0))
        record, total = LetterRecord(main=main), 0.0
        for i in true_pos:
            a_model = float(task["x_score"][i].astype(np.float32) @ direction)
            frac, full = word_absorption(a_model, F_score[i], cos, main, acfg)
            total += frac
            if frac > 0 or full:
                for j in absorbing_latents(F_score[i], cos, main, acfg) or [int(np.argmax(F_score[i] * cos))]:
                    record.absorbers.setdefault(j, []).append(words[i])
        record.absorption_fraction = total / len(true_pos) if len(true_pos) else None
        records[LETTERS[c]] = record
    return records


def word_latents(sae, acts: np.ndarray, words: list[str]) -> dict[str, list]:
    """For each absorption word: the latents firing most on its prompt's word token."""
    from atmpipe.eval.absorption import encode_all

    F = encode_all(sae, acts)
    top = np.argsort(-F, axis=1, kind="stable")[:, :WORD_LATENTS]
    return {
        w: [[int(j), round(float(F[i, j]), 3)] for j in top[i] if F[i, j] > 0] for i, w in enumerate(words)
    }
