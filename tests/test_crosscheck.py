"""`make crosscheck`'s reuse of earlier seeds (stages/crosscheck.py): a seed is reused only when it was made
on the same word sample and the same SAE weights, so an SAE retrained under its old name is run again."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "stages"))
import crosscheck  # noqa: E402

from atmpipe.sae.base import WEIGHTS_FILE  # noqa: E402


def test_the_weights_it_hashes_are_the_file_atmpipe_writes():
    assert crosscheck.WEIGHTS == WEIGHTS_FILE


def test_a_seed_is_reused_only_on_the_same_words_and_weights(tmp_path):
    saes = []
    for name in ("atm", "topk"):
        (tmp_path / name).mkdir()
        (tmp_path / name / crosscheck.WEIGHTS).write_bytes(name.encode() * 100)
        saes.append(str(tmp_path / name))
    ident = crosscheck.identity("words-sha", saes)
    assert set(ident["sae_sha256"]) == {"atm", "topk"}
    record = tmp_path / "saebench_seed0.json"
    record.write_text(json.dumps({"identity": ident, "run": {"seed": 0}}))

    assert crosscheck.reusable(record, crosscheck.identity("words-sha", saes))["run"] == {"seed": 0}
    assert crosscheck.reusable(record, crosscheck.identity("other-words", saes)) is None
    assert crosscheck.reusable(tmp_path / "missing.json", ident) is None
    (tmp_path / "atm" / crosscheck.WEIGHTS).write_bytes(b"retrained")  # same name, new weights
    assert crosscheck.reusable(record, crosscheck.identity("words-sha", saes)) is None
    record.write_text(json.dumps({"run": {"seed": 0}}))  # made before runs carried their identity
    assert crosscheck.reusable(record, ident) is None
