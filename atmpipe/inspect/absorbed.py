"""The per-letter absorption record the browser shows: letter → main latents, absorbing latents, words.

Read from an `atmpipe eval` results.json (per SAE, `results[name]["absorption"]["per_letter"][letter]`
with `main_latents` and, where the eval records it, `absorbers`: [{"latent": j, "words": [...]}]), or
computed on request with the absorption metric's own public functions (same probe, same main latents,
same absorber rule), whose LM activations come from the eval's cache when `atmpipe eval` ran first.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from atmpipe.errors import UserError

WORD_LATENTS = 8  # latents kept per absorption word (the page ranks them relative to each latent's max)


@dataclass
class LetterRecord:
    main: list[int]
    absorbers: dict[int, list[str]] = field(default_factory=dict)  # absorbing latent → words it absorbed
    absorption_fraction: float | None = None
    full_absorption: float | None = None  # share of scored words whose main latents all stayed silent
    n_scored: int | None = None  # the letter's test words the probe gets right (the ones scored)
    absorbers_recorded: bool = True  # False: the eval result names main latents only

    def to_json(self) -> dict:
        return {
            "main": self.main,
            "absorbers": [
                [j, words] for j, words in sorted(self.absorbers.items(), key=lambda t: -len(t[1]))
            ],
            "fraction": self.absorption_fraction,
            "full": self.full_absorption,
            "n_scored": self.n_scored,
            "absorbers_recorded": self.absorbers_recorded,
        }


def read_eval_results(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(
            f"cannot read eval result {path} ({e}); pass a results.json written by `atmpipe eval`"
        ) from None


def gate_summary(summary: dict | None) -> dict | None:
    """From the absorption summary (results.json's `shared.absorption`): each letter's probe F1 and the gate."""
    if not summary or "probe_f1" not in summary:
        return None
    return {
        "probe_f1": {c: round(float(f), 4) for c, f in summary["probe_f1"].items()},
        "gate": summary.get("probe_f1_gate"),
        "test_words": summary.get("test_words_per_letter", {}),
    }


def from_eval_results(path: Path, sae_name: str) -> dict[str, LetterRecord] | None:
    """The SAE's per-letter records in an eval results.json, or None if it holds no absorption for it."""
    payload = read_eval_results(path)
    absorption = (payload.get("results", {}).get(sae_name) or {}).get("absorption") or {}
    per_letter = absorption.get("per_letter")
    return from_per_letter(per_letter) if isinstance(per_letter, dict) else None


def from_per_letter(per_letter: dict) -> dict[str, LetterRecord]:
    """Records from the absorption metric's `per_letter` (results written before absorbers were recorded
    name main latents only)."""
    records = {}
    for letter, row in per_letter.items():
        absorbers = row.get("absorbers")
        records[letter] = LetterRecord(
            main=[int(j) for j in row.get("main_latents", [])],
            absorbers={int(a["latent"]): list(a["words"]) for a in absorbers or []},
            absorption_fraction=row.get("absorption_fraction"),
            full_absorption=row.get("full_absorption"),
            n_scored=row.get("n_probe_true_positives"),
            absorbers_recorded=absorbers is not None,
        )
    return records


def compute(sae, task: dict, probe: dict, acfg) -> dict[str, LetterRecord]:
    """Per-letter records for one SAE, computed by the absorption metric itself on its task (its
    `Absorption.task`) for every letter past the probe gate, however few (the browser shows what there is)."""
    from atmpipe.eval.compute.absorption import (
        absorption_metrics,  # sklearn: only when the browser shows absorption
    )

    result = absorption_metrics(sae, task, probe, dataclasses.replace(acfg, min_letters=0))
    return from_per_letter(result.get("per_letter", {}))  # none when no letter passes the probe gate


def word_latents(sae, acts: np.ndarray, words: list[str]) -> dict[str, list]:
    """For each absorption word: the latents firing most on its prompt's word token."""
    from atmpipe.eval.compute.absorption import encode_all  # sklearn: only when the browser shows absorption

    F = encode_all(sae, acts)
    top = np.argsort(-F, axis=1, kind="stable")[:, :WORD_LATENTS]
    return {
        w: [[int(j), round(float(F[i, j]), 3)] for j in top[i] if F[i, j] > 0] for i, w in enumerate(words)
    }
