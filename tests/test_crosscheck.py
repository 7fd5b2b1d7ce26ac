"""`make crosscheck`'s reuse of earlier seeds (stages/crosscheck.py): a seed is reused only when it was made
on the same word sample and the same SAE weights, so an SAE retrained under its old name is run again."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

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


def runs(by_sae: dict[str, list[float]], side: str) -> list[dict]:
    """Per seed, one side's record as compare() reads it, full absorption = fraction = the given values."""
    seeds = len(next(iter(by_sae.values())))
    if side == "atmpipe":
        return [{"results": {n: {"absorption": {k: v[s] for k in crosscheck.METRICS.values()}} for n, v in by_sae.items()}} for s in range(seeds)]  # fmt: skip
    return [
        {"saes": {n: {m: v[s] for m in crosscheck.METRICS} for n, v in by_sae.items()}} for s in range(seeds)
    ]


def test_the_pass_rule_is_the_welch_interval_inside_the_tolerance():
    import statistics

    from scipy.stats import t as student_t

    ours, theirs = [0.30, 0.32, 0.34], [0.31, 0.33, 0.32, 0.34]
    r = crosscheck.agreement(ours, theirs)
    va, vb = statistics.variance(ours) / 3, statistics.variance(theirs) / 4
    dof = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 3)
    half = student_t.ppf(0.975, dof) * (va + vb) ** 0.5
    diff = statistics.fmean(ours) - statistics.fmean(theirs)
    assert r["ci95"] == pytest.approx([diff - half, diff + half]) and r["pass"]
    # the same means with a wide spread: the interval leaves ±0.05, so it fails though the means agree
    wide = crosscheck.agreement([0.1, 0.5, 0.3], [0.0, 0.6, 0.3])
    assert abs(wide["diff"]) < 1e-9 and not wide["pass"]
    # one seed a side has no interval, so it cannot pass
    assert (
        crosscheck.agreement([0.3], [0.3])["ci95"] is None and not crosscheck.agreement([0.3], [0.3])["pass"]
    )


def test_the_ranking_rule_binds_only_pairs_saebench_separates():
    atm = {"a": [0.10, 0.11, 0.12], "b": [0.13, 0.12, 0.14], "c": [0.40, 0.41, 0.42]}
    sb = {"a": [0.13, 0.10, 0.16], "b": [0.11, 0.14, 0.08], "c": [0.40, 0.42, 0.41]}
    result = crosscheck.compare(runs(atm, "atmpipe"), runs(sb, "saebench"), ["a", "b", "c"])
    pairs = [p["pair"] for p in result["ranking"]["full"]["separated_by_saebench"]]
    assert pairs == [["a", "c"], ["b", "c"]]  # a and b overlap in SAEBench's seeds: no order required
    assert result["ranking"]["full"]["same"]
    swapped = dict(atm, c=[0.01, 0.02, 0.03])  # atmpipe puts c below a and b, SAEBench above
    result = crosscheck.compare(runs(swapped, "atmpipe"), runs(sb, "saebench"), ["a", "b", "c"])
    assert not result["ranking"]["full"]["same"] and not result["pass"]


SAEBENCH_PY = REPO / ".venv-saebench" / "bin" / "python"
STOP_AFTER_LAYER = """
import sys, torch
sys.path.insert(0, sys.argv[1])
import crosscheck
from transformer_lens import HookedTransformer, HookedTransformerConfig
cfg = HookedTransformerConfig(n_layers=4, d_model=32, d_head=8, n_ctx=16, d_vocab=97, act_fn="gelu", seed=0)
model = HookedTransformer(cfg)
tokens = torch.randint(0, 97, (3, 12), generator=torch.Generator().manual_seed(1))
hook = "blocks.1.hook_resid_post"
full = model.run_with_cache(tokens, names_filter=[hook])[1][hook]
crosscheck.stop_after_layer(HookedTransformer, 1)
calls = []
model.blocks[2].register_forward_hook(lambda *a: calls.append(1))
stopped = model.run_with_cache(tokens, names_filter=[hook])[1][hook]
print(torch.equal(full, stopped), len(calls))
"""


@pytest.mark.skipif(not SAEBENCH_PY.exists(), reason="no .venv-saebench (make saebench)")
def test_stopping_saebenchs_forward_after_the_hooked_layer_leaves_its_residual_bit_for_bit():
    import subprocess

    out = subprocess.run(
        [str(SAEBENCH_PY), "-c", STOP_AFTER_LAYER, str(REPO / "stages")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.split() == ["True", "0"]  # the same residual, and block 2 never ran
