"""The verdict's statistics (stages/verdict.py, stages/frontier.py) on constructed data: the Welch interval over
training seeds with eval seeds folded in, the paired word bootstrap, no borrowing of a seed spread, TOST
equivalence and the wording each result allows."""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import t as student_t

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "stages"))
import frontier  # noqa: E402
import verdict  # noqa: E402

FRAC, FULL, FVU = "absorption.mean_absorption_fraction", "absorption.mean_full_absorption", "core.fvu"


def cell(values, metric=FRAC, ci=None, eval_seeds=3, runs=None) -> dict:
    return {
        "metrics": {metric: frontier.spread(values)},
        "ci95": {metric: ci} if ci else {},
        "eval_seeds": {metric: eval_seeds},
        "runs": runs or [],
    }


def test_interval_is_welch_over_training_seeds_plus_the_word_term():
    a, b = [0.10, 0.12, 0.15], [0.40, 0.50, 0.45, 0.47]
    summary = {"atm": {"64": cell(a, ci=[0.05, 0.19])}, "topk": {"64": cell(b, ci=[0.35, 0.55])}}
    (row,) = verdict.compare(summary, "atm", "topk", "64", "q")
    va, vb = statistics.variance(a) / 3, statistics.variance(b) / 4
    words = math.hypot(0.07 / 1.96, 0.10 / 1.96)
    se = math.sqrt(va + vb + words**2)
    dof = se**4 / (va**2 / 2 + vb**2 / 3)
    half = student_t.ppf(0.975, dof) * se
    diff = statistics.fmean(a) - statistics.fmean(b)
    assert row["diff"] == pytest.approx(diff) and row["se"] == pytest.approx(se)
    assert row["dof"] == pytest.approx(dof)
    assert row["ci95"] == pytest.approx([diff - half, diff + half]) and row["separated"]
    assert row["interval"] == "training seeds, eval seeds folded in, + words"
    assert row["words"] == "each side's word-bootstrap CI"
    assert row["summary"] == f"{diff:+.3f} [{diff - half:+.3f}, {diff + half:+.3f}]: separated"


def test_one_training_seed_gets_no_interval_and_borrows_no_spread():
    summary = {
        "atm": {"64": cell([0.10, 0.12, 0.14], FVU), "128": cell([0.30], FVU)},
        "topk": {"64": cell([0.40, 0.50, 0.45], FVU), "128": cell([0.41], FVU)},
        "atm-x4": {"64": cell([0.08], FVU)},
        "topk-x4": {"64": cell([0.41], FVU)},
    }
    rows = verdict.comparisons(summary, head=64)
    at128 = next(r for r in rows if r["l0"] == 128)
    assert at128["ci95"] is None and at128["separated"] is None and at128["equivalent"] is None
    assert at128["interval"] == "unavailable: atm has 1 training seed here (no seed spread is borrowed)"
    assert at128["summary"] == f"{0.30 - 0.41:+.3f}: no interval"
    longer = next(r for r in rows if r.get("a") == "atm-x4")
    assert longer["ci95"] is None and "atm-x4 has 1 training seed" in longer["interval"]
    gap = next(r for r in rows if r["question"].startswith("ATM − TopK gap"))
    assert gap["diff"] == pytest.approx((0.08 - 0.41) - (0.12 - 0.45)) and gap["ci95"] is None
    assert gap["interval"].startswith("unavailable: atm-x4, topk-x4 with 1 training seed")
    # the head level, with its own seeds, still has its interval
    head = next(r for r in rows if r["l0"] == 64 and r.get("b") == "topk")
    assert head["ci95"] is not None and head["interval"] == "training seeds"
    text = verdict.markdown(rows)
    assert (
        "| 128 | FVU | atm 0.300 (1 training seed) | topk 0.410 (1 training seed) | -0.110: no interval |"
        in text
    )


def test_absorption_without_three_eval_seeds_gets_no_interval_but_core_metrics_do():
    summary = {
        "atm": {
            "64": {
                **cell([0.1, 0.2, 0.15], FULL, eval_seeds=1),
                "metrics": {FULL: frontier.spread([0.1, 0.2, 0.15]), FVU: frontier.spread([0.2, 0.21, 0.19])},
            }
        },  # fmt: skip
        "relu": {
            "64": {
                **cell([0.2, 0.3, 0.25], FULL, eval_seeds=1),
                "metrics": {FULL: frontier.spread([0.2, 0.3, 0.25]), FVU: frontier.spread([0.1, 0.11, 0.12])},
            }
        },  # fmt: skip
    }
    rows = {r["metric"]: r for r in verdict.compare(summary, "atm", "relu", "64", "q")}
    assert rows[FULL]["ci95"] is None
    assert rows[FULL]["interval"] == (
        "unavailable: atm has 1 eval seed(s), 3 needed (the probes' randomness is unmeasured)"
    )
    assert rows[FVU]["ci95"] is not None and rows[FVU]["separated"]


def test_tost_equivalence_and_the_wording_of_a_non_separation():
    # two series 0.002 apart with a tight spread: equivalent within ±0.05
    summary = {
        "a": {"64": cell([0.200, 0.201, 0.202, 0.203])},
        "b": {"64": cell([0.198, 0.199, 0.200, 0.201])},
        "c": {"64": cell([0.10, 0.30, 0.20, 0.40])},
    }
    (eq,) = verdict.compare(summary, "a", "b", "64", "q")[:1]
    se, dof = eq["se"], eq["dof"]
    p = max(student_t.sf((eq["diff"] + 0.05) / se, dof), student_t.cdf((eq["diff"] - 0.05) / se, dof))
    assert eq["tost_p"] == pytest.approx(p) and eq["tost_p"] < 0.05 and eq["equivalent"]
    assert not eq["separated"] and eq["summary"].endswith(f"equivalent within ±0.05 (TOST p = {p:.3f})")
    # the same difference with a wide spread: neither separated nor equivalent; the detectable difference
    (wide,) = verdict.compare(summary, "c", "a", "64", "q")[:1]
    assert not wide["separated"] and not wide["equivalent"]
    detectable = (student_t.ppf(0.975, wide["dof"]) + student_t.ppf(0.80, wide["dof"])) * wide["se"]
    assert wide["detectable"] == pytest.approx(detectable)
    assert wide["summary"].endswith(
        f": not separated; the smallest difference this run could detect is {detectable:.3f}"
    )
    # TOST by hand at its edges: a difference exactly at the margin is never equivalent
    assert verdict.tost(0.05, 0.01, 10, 0.05) == pytest.approx(0.5)
    assert verdict.tost(0.0, 0.0, 10, 0.05) == 0.0


def words_of(values_by_letter: dict[str, np.ndarray]) -> dict:
    return {c: {"words": [f"{c}{i}" for i in range(len(v))], "word_fraction": v.tolist()} for c, v in values_by_letter.items()}  # fmt: skip


def test_paired_bootstrap_cancels_what_two_saes_share_word_by_word():
    rng = np.random.default_rng(0)
    base = {c: rng.uniform(0, 1, 200) for c in "abc"}  # large word-to-word variation
    a = [{0: words_of(base)}]
    b = [{0: words_of({c: v + 0.1 for c, v in base.items()})}]  # the same words, shifted by 0.1 each
    assert verdict.paired_words_se(a, b, "word_fraction") == pytest.approx(0.0, abs=1e-12)
    # independent per-word values: the paired se matches the analytic one, sqrt(Σ var(d)/m) / letters
    other = {c: rng.uniform(0, 1, 200) for c in "abc"}
    b = [{0: words_of(other)}]
    analytic = math.sqrt(sum(np.var(base[c] - other[c]) / 200 for c in "abc")) / 3
    assert verdict.paired_words_se(a, b, "word_fraction", n=4000) == pytest.approx(analytic, rel=0.08)
    # two eval seeds average: the se of the mean of two independent evals' differences is 1/√2 as large
    two = verdict.paired_words_se(
        [{0: a[0][0], 1: a[0][0]}], [{0: b[0][0], 1: b[0][0]}], "word_fraction", n=4000
    )
    assert two == pytest.approx(analytic / math.sqrt(2), rel=0.08)
    # other words on one side: not paired (None), and the comparison falls back to each side's CI
    shifted = {c: {**v, "words": v["words"][::-1]} for c, v in words_of(other).items()}
    assert verdict.paired_words_se(a, [{0: shifted}], "word_fraction") is None
    assert verdict.paired_words_se(a, [{1: words_of(other)}], "word_fraction") is None


def test_a_comparison_uses_the_paired_bootstrap_where_both_sides_have_per_word_results():
    rng = np.random.default_rng(1)
    base = {c: rng.uniform(0, 1, 100) for c in "ab"}
    words = {
        f"atm-L64-s{s}": {e: words_of({c: v + 0.01 * s for c, v in base.items()}) for e in (0, 1, 2)} for s in (0, 1, 2)
    } | {f"relu-L64-s{s}": {e: words_of({c: v + 0.2 for c, v in base.items()}) for e in (0, 1, 2)} for s in (0, 1, 2)}  # fmt: skip
    summary = {
        "atm": {"64": cell([0.50, 0.51, 0.52], ci=[0.3, 0.7], runs=[f"atm-L64-s{s}" for s in (0, 1, 2)])},
        "relu": {"64": cell([0.70, 0.72, 0.71], ci=[0.5, 0.9], runs=[f"relu-L64-s{s}" for s in (0, 1, 2)])},
    }
    (row,) = verdict.compare(summary, "atm", "relu", "64", "q", words)[:1]
    assert row["words"] == "paired bootstrap over shared words"
    # the shared words cancel: only the training seeds are left in the interval
    assert row["se"] == pytest.approx(math.sqrt(statistics.variance([0.50, 0.51, 0.52]) / 3 + statistics.variance([0.70, 0.72, 0.71]) / 3))  # fmt: skip


def eval_group(root: Path, group: str, seed: int, values: dict[str, float]) -> None:
    payload = {
        "run": {"config": {"seed": seed}},
        "saes": {},
        "results": {
            n: {"absorption": {"status": "ok", "mean_full_absorption": v}} for n, v in values.items()
        },
    }
    (root / "evals" / group).mkdir(parents=True)
    (root / "evals" / group / "results.json").write_text(json.dumps(payload))


def test_eval_seeds_are_averaged_within_an_sae_before_the_training_seed_spread(tmp_path):
    by_seed = {0: {"atm-L64-s0": 0.1, "atm-L64-s1": 0.3}, 1: {"atm-L64-s0": 0.2, "atm-L64-s1": 0.5}}
    by_seed[2] = {"atm-L64-s0": 0.3, "atm-L64-s1": 0.4}
    for seed, values in by_seed.items():
        eval_group(tmp_path, "head" if seed == 0 else f"head-e{seed}", seed, values)
    runs = frontier.collect(tmp_path)
    assert runs["atm-L64-s0"]["metrics"][FULL] == pytest.approx(0.2)
    assert runs["atm-L64-s1"]["metrics"][FULL] == pytest.approx(0.4)
    assert runs["atm-L64-s0"]["eval_seeds"][FULL] == 3
    c = frontier.summarise(runs)["atm"][64]
    assert c["metrics"][FULL]["mean"] == pytest.approx(0.3) and c["metrics"][FULL]["n"] == 2
    assert c["metrics"][FULL]["sd"] == pytest.approx(statistics.stdev([0.2, 0.4]))
    assert c["eval_seeds"][FULL] == 3
    assert c["eval_sd"][FULL] == pytest.approx(math.sqrt((0.01 + 0.01) / 2))  # variances 0.01 and 0.01
    # the same eval seed twice is refused
    eval_group(tmp_path, "again", 1, {"atm-L64-s0": 0.2})
    with pytest.raises(ValueError, match="run atm-L64-s0 is in two eval groups at eval seed 1"):
        frontier.collect(tmp_path)


# --- provenance -------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent


def test_a_finished_stage_records_the_commit_and_the_diff_it_ran_at(tmp_path):
    import hashlib
    import subprocess

    script = f"source stages/lib.sh; RECORD={tmp_path}; stage demo {tmp_path}/out -- touch {tmp_path}/out"
    subprocess.run(["bash", "-c", script], cwd=REPO, check=True, capture_output=True)
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True).stdout  # fmt: skip
    diff = subprocess.run(["git", "diff", "HEAD"], cwd=REPO, capture_output=True).stdout
    sys.path.insert(0, str(REPO / "stages"))
    import experiment

    got = experiment.code_versions(tmp_path)["demo"]
    assert got["commit"] == head
    assert got["diff_sha256"] == (hashlib.sha256(diff).hexdigest() if dirty else None)


def test_content_hash_covers_names_and_bytes_and_its_cache_follows_changes(tmp_path):
    import experiment

    store = tmp_path / "s.zarr"
    (store / "a").mkdir(parents=True)
    (store / "a" / "0").write_bytes(b"x" * 100)
    (store / "zarr.json").write_text("{}")
    first = experiment.cached_sha256(store, tmp_path / "hashes.json")
    assert first == experiment.content_sha256(store)
    (store / "a" / "0").write_bytes(b"y" * 100)  # same size, new bytes (and a new mtime)
    assert experiment.cached_sha256(store, tmp_path / "hashes.json") != first
    assert experiment.cached_sha256(tmp_path / "missing", tmp_path / "hashes.json") is None


def test_comparisons_are_marked_where_their_sides_ran_at_different_code():
    v1, v2 = {"commit": "a" * 40, "diff_sha256": None}, {"commit": "b" * 40, "diff_sha256": None}
    runs = {
        n: {"by_eval_seed": {"0": {"group": "head"}}} for n in ("atm-L64-s0", "topk-L64-s0", "relu-L64-s0")
    }
    stages = {"train-atm-L64-s0": v1, "train-topk-L64-s0": v1, "train-relu-L64-s0": v2, "eval-head": v1}
    code = frontier.code_of(runs, stages)
    summary = {s: {"64": {"runs": [f"{s}-L64-s0"]}} for s in ("atm", "topk", "relu")}
    rows = [{"a": "atm", "b": b, "l0": 64} for b in ("topk", "relu")]
    frontier.mark_code(rows, summary, code)
    assert [r["same_code"] for r in rows] == [True, False]
    frontier.mark_code(rows, summary, frontier.code_of(runs, {}))  # nothing recorded: unknown, not "same"
    assert [r["same_code"] for r in rows] == [None, None]


def test_the_record_lists_the_stages_code_hashes_and_the_crosschecks_seeds(tmp_path, monkeypatch):
    import experiment

    record, out, store = tmp_path / "runs", tmp_path / "results", tmp_path / "s.zarr"
    record.mkdir()
    (store / "c").mkdir(parents=True)
    (store / "c" / "0").write_bytes(b"activations")
    (record / "commands.sh").write_text("atmpipe harvest\n")
    (record / "wall_times.tsv").write_text("harvest\t10\tok\t2026-12-07T00:00:00Z\n")
    (record / "provenance.tsv").write_text(f"harvest\t{'c' * 40}\t-\t2026-12-07T00:00:00Z\n")
    (out / "crosscheck").mkdir(parents=True)
    cross = {"atmpipe_runs": [{"command": "atmpipe eval --seed 3"}], "saebench_runs": [{"seed": 3}]}
    (out / "crosscheck" / "crosscheck.json").write_text(json.dumps(cross))
    monkeypatch.setenv("STORE", str(store))
    monkeypatch.delenv("MODEL", raising=False)
    experiment.record(record, out)
    saved = json.loads((out / "experiment.json").read_text())
    assert saved["commands"] == ["atmpipe harvest"]
    assert saved["crosscheck_commands"] == ["atmpipe eval --seed 3", "# SAEBench absorption run_eval, seed 3 (stages/crosscheck.py)"]  # fmt: skip
    prov = saved["provenance"]
    assert prov["stages"]["harvest"] == {"commit": "c" * 40, "diff_sha256": None, "finished_utc": "2026-12-07T00:00:00Z"}  # fmt: skip
    assert prov["store_sha256"] == experiment.content_sha256(store) and prov["model_sha256"] is None


def test_convergence_status_per_method_from_the_two_longest_lengths(tmp_path):
    import convergence

    def at(values):
        return {"64": cell(values, FVU)}

    summary = {
        "atm": at([0.30, 0.31, 0.29]), "atm-x4": at([0.20, 0.21, 0.19]), "atm-x16": at([0.205, 0.195, 0.20]),
        "topk": at([0.10, 0.11, 0.12]), "topk-x4": at([0.08, 0.081, 0.079]), "topk-x16": at([0.05, 0.051, 0.049]),
        "relu": at([0.2, 0.21, 0.19]), "relu-x4": at([0.15]), "relu-x16": at([0.1, 0.11, 0.12]),
    }  # fmt: skip
    summary["atm-x16"]["64"]["runs"] = ["atm-L64-s0-x16", "atm-L64-s1-x16", "atm-L64-s2-x16"]
    runs = {f"atm-L64-s{s}-x16": {"epochs": 7.1} for s in range(3)}  # 32M tokens over a 4.7M-token store
    result = convergence.axis(summary, ["atm", "topk", "relu", "jumprelu"], "64", runs=runs)
    assert result["atm"][FVU]["points"][-1]["passes"] == pytest.approx(7.1)
    assert result["atm"][FVU]["points"][0]["passes"] is None  # not known without the runs' metadata
    assert set(result) == {"atm", "topk", "relu"}  # a method without lengths is left out
    assert result["atm"][FVU]["status"] == "converged"  # 8M → 32M: 0.20 → 0.20
    assert result["topk"][FVU]["status"] == "still moving"  # 0.08 → 0.05, beyond its interval
    assert result["relu"][FVU]["status"] == "undetermined"  # one seed at 8M: no interval, never "converged"
    change = result["topk"][FVU]["change"]
    assert change["from_tokens"] == 4 * 2_097_152 and change["to_tokens"] == 16 * 2_097_152
    assert change["diff"] == pytest.approx(0.05 - 0.08)
    pts = result["atm"][FVU]["points"]
    assert [p["tokens"] for p in pts] == [2_097_152, 8_388_608, 33_554_432]
    assert pts[0]["half_width_95"] == pytest.approx(student_t.ppf(0.975, 2) * 0.01 / 3**0.5)
    assert convergence.figure(result, FVU, tmp_path / "fvu.png") and (tmp_path / "fvu.png").stat().st_size > 0
    text = convergence.markdown(result)
    assert "| topk | FVU | 2M 0.110 (3), 8M 0.080 (3), 32M 0.050 (3) |" in text
    assert "32M 0.200 (3, 7.1 passes)" in text


# --- Matryoshka and the paper's claims 3-5, from eval results.json files as `atmpipe eval` writes them ------

SEEDS = (0, 1, 2)
CLAIM_SERIES = {  # series → per training seed: FVU, full absorption, probing k=1, k=5, sentiment k=1, TPP
    "atm": [
        (0.30, 0.10, 0.710, 0.760, 0.80, 0.10),
        (0.31, 0.12, 0.715, 0.770, 0.81, 0.11),
        (0.29, 0.11, 0.720, 0.765, 0.82, 0.12),
    ],  # fmt: skip
    "topk": [
        (0.10, 0.40, 0.600, 0.700, 0.70, 0.10),
        (0.11, 0.42, 0.605, 0.705, 0.71, 0.11),
        (0.12, 0.41, 0.610, 0.710, 0.72, 0.12),
    ],  # fmt: skip
    "matryoshka": [
        (0.12, 0.05, 0.690, 0.800, 0.75, 0.30),
        (0.13, 0.06, 0.740, 0.810, 0.76, 0.31),
        (0.11, 0.07, 0.700, 0.805, 0.77, 0.32),
    ],  # fmt: skip
}
PROBE_HW, TPP_HW, SCR_MDD = 0.015, 0.02, 2.3  # the sections' own 95% half-widths; SCR's MDD (unresolved)


def sections(fvu, full, k1, k5, sent, tpp, eval_seed) -> dict:
    """One SAE's eval record: absorption at every eval seed (moved a little by it), the rest at eval seed 0 —
    SCR unresolved (its score present in the record, as the eval writes it), TPP resolved."""
    absorption = {"status": "ok", "mean_full_absorption": full + 0.01 * eval_seed, "mean_absorption_fraction": full / 2,
                  "ci95_full_absorption": [full - 0.03, full + 0.03], "ci95_absorption_fraction": [full / 2 - 0.02, full / 2 + 0.02]}  # fmt: skip
    if eval_seed:
        return {"absorption": absorption}
    iv = lambda v, h: [v - h, v + h]  # noqa: E731
    probing = {"mean_sae_top_1": k1, "ci95_sae_top_1": iv(k1, PROBE_HW), "mean_sae_top_5": k5, "ci95_sae_top_5": iv(k5, PROBE_HW),
               "sentiment_sae_top_1": sent, "ci95_sentiment_sae_top_1": iv(sent, 2 * PROBE_HW),
               "share_beats_resid_top_1": k1 - 0.3, "share_beats_resid_top_1_separated": 0.1,
               "share_beats_resid_top_5": k5 - 0.3, "share_beats_resid_top_5_separated": 0.2, "groups": {}}  # fmt: skip
    bias = {"status": "unresolved", "n_pairs": 8, "n_test": 516, "a_base": 0.665, "a_oracle": 0.785, "scr_headline": -0.65,
            "ci95_scr_headline": [-1.6, 1.6], "mdd_headline": SCR_MDD, "half_width_headline": 1.6, "reason": "MDD"}  # fmt: skip
    tpp_ = {"status": "ok", "n_sets": 5, "tpp_headline": tpp, "ci95_tpp_headline": iv(tpp, TPP_HW),
            "mdd_headline": 2**0.5 * TPP_HW, "half_width_headline": TPP_HW}  # fmt: skip
    core = {"fvu": fvu, "ce_loss_score": 0.9, "l0": 64.0}
    return {"core": core, "absorption": absorption, "probing": probing, "bias": bias, "tpp": tpp_}


def claim_results(root: Path) -> Path:
    """evals/head (seed 0 SAEs) and evals/seeds (seeds 1, 2) at eval seed 0, each again at eval seeds 1 and 2."""
    shared = {"absorption": {"protocol": "saebench-0.6", "sample": {"words": 11490, "seed": 0, "kind": "k"}, "seed": 0,
                             "n_words_train": 9192, "n_words_test": 2298, "letters_passed": 24,
                             "test_words_per_letter": {"a": 120, "x": 60}}}  # fmt: skip
    for group, seeds in (("head", [0]), ("seeds", [1, 2])):
        for e in SEEDS:
            results = {f"{s}-L64-s{t}": sections(*CLAIM_SERIES[s][t], e) for s in CLAIM_SERIES for t in seeds}
            name = group + (f"-e{e}" if e else "")
            (root / "evals" / name).mkdir(parents=True)
            payload = {"run": {"config": {"seed": e}}, "saes": {}, "results": results, "shared": shared}
            (root / "evals" / name / "results.json").write_text(json.dumps(payload))
    return root


def test_atm_against_matryoshka_is_its_own_question_with_the_same_intervals(tmp_path):
    payload = frontier.write(claim_results(tmp_path))
    rows = {r["metric"]: r for r in payload["comparisons"] if r["b"] == "matryoshka"}
    assert {r["question"] for r in rows.values()} == {"ATM against Matryoshka (BatchTopK with nested prefixes) at matched L0"}  # fmt: skip
    # absorption: 3 training seeds × 3 eval seeds, so an interval, built as every other method's
    full = rows[FULL]
    assert full["atm"]["eval_seeds"] == 3 and full["ci95"] is not None
    assert full["interval"] == "training seeds, eval seeds folded in, + words"
    a = [f + 0.01 for _, f, *_ in CLAIM_SERIES["atm"]]  # the mean over eval seeds 0, 1, 2 adds 0.01
    b = [f + 0.01 for _, f, *_ in CLAIM_SERIES["matryoshka"]]
    se = math.sqrt(statistics.variance(a) / 3 + statistics.variance(b) / 3 + 2 * (0.03 / Z) ** 2)
    assert full["diff"] == pytest.approx(statistics.fmean(a) - statistics.fmean(b)) and full[
        "se"
    ] == pytest.approx(se)
    topk = next(r for r in payload["comparisons"] if r["b"] == "topk" and r["metric"] == FULL)
    assert (
        topk["question"] == "ATM against each method at matched L0" and topk["interval"] == full["interval"]
    )
    assert rows[FVU]["interval"] == "training seeds" and rows[FVU]["separated"]
    assert (
        "## ATM against Matryoshka (BatchTopK with nested prefixes) at matched L0"
        in (tmp_path / "verdict.md").read_text()
    )


Z = 1.96


def test_claim_3_probing_compares_atm_with_each_method_and_counts_tasks_beating_the_residual(tmp_path):
    claims = frontier.write(claim_results(tmp_path))["claims"]
    p = claims["probing"]
    rows = {(r["b"], r["metric"]): r for r in p["rows"]}
    k1 = [v[2] for v in CLAIM_SERIES["atm"]], [v[2] for v in CLAIM_SERIES["topk"]]
    va, vb = (statistics.variance(v) / 3 for v in k1)
    se = math.sqrt(va + vb + 2 * (PROBE_HW / Z) ** 2)  # training seeds + each side's test/probe-seed interval
    r = rows["topk", "probing.mean_sae_top_1"]
    assert r["se"] == pytest.approx(se) and r["separated"] and r["diff"] > 0
    assert r["dof"] == pytest.approx(se**4 / (va**2 / 2 + vb**2 / 2))
    assert r["interval"] == "training seeds + test-example bootstrap + probe seeds (each side's interval)"
    assert rows["matryoshka", "probing.mean_sae_top_1"]["separated"] is False
    assert rows["matryoshka", "probing.mean_sae_top_5"]["separated"] and rows["matryoshka", "probing.mean_sae_top_5"]["diff"] < 0  # fmt: skip
    assert p["answer"] == (
        "contradicted — mean probing accuracy, k = 1: above (separated) topk; not separated from matryoshka"
        " · mean probing accuracy, k = 5: above (separated) topk; below (separated) matryoshka"
    )
    shares = p["beats_residual"]["atm"]
    assert shares["k1"] == pytest.approx(statistics.fmean(k1[0]) - 0.3) and shares[
        "k1_separated"
    ] == pytest.approx(0.1)
    assert shares["training_seeds"] == 3 and set(p["beats_residual"]) == set(CLAIM_SERIES)
    assert p["paper"] == 0.7161


def test_claim_4_sentiment_is_the_group_mean_with_its_interval_against_the_papers_number(tmp_path):
    s = frontier.write(claim_results(tmp_path))["claims"]["sentiment"]
    atm = next(r for r in s["rows"] if r["series"] == "atm" and r["metric"] == "probing.sentiment_sae_top_1")
    values = [v[4] for v in CLAIM_SERIES["atm"]]
    va = statistics.variance(values) / 3
    se = math.sqrt(va + (2 * PROBE_HW / Z) ** 2)
    half = student_t.ppf(0.975, se**4 / (va**2 / 2)) * se
    mean = statistics.fmean(values)
    assert atm["diff"] == pytest.approx(mean - 0.853) and atm["se"] == pytest.approx(se)
    assert atm["value_ci95"] == pytest.approx([mean - half, mean + half])
    assert atm["separated"] and s["answer"].startswith(
        f"ATM's sentiment accuracy, k = 1 {mean:.3f} [{mean - half:.3f}, {mean + half:.3f}]: below the paper's 0.853 (separated)"
    )
    assert "not the paper's Gemma-2-2b" in s["answer"]
    assert {r["series"] for r in s["rows"]} == set(CLAIM_SERIES)  # every method's value, for context


def test_claim_5_drops_scr_it_cannot_resolve_and_compares_tpp_it_can(tmp_path):
    payload = frontier.write(claim_results(tmp_path))
    b = payload["claims"]["bias"]
    scr = b["bias"]
    assert scr["resolved"] is False and "rows" not in scr and scr["mdd"] == pytest.approx(SCR_MDD)
    assert scr["answer"] == (
        "SCR at N = 20 cannot resolve a difference of 0.1 on this data (largest minimum detectable difference at "
        "95% over the SAEs: 2.30); dropped from the verdict, no difference printed"
    )
    assert scr["per_series"]["atm"] | {"score": None} == pytest.approx({
        "n_test": 516, "n_pairs": 8, "a_base": 0.665, "a_oracle": 0.785, "mdd_headline": SCR_MDD,
        "half_width_headline": 1.6, "score": None, "mdd_max": SCR_MDD})  # fmt: skip
    # the unresolved score never reaches the summary, so no table can print it
    cell = payload["summary"]["atm"]["64"]["metrics"]
    assert "bias.scr_headline" not in cell and cell["bias.mdd_headline"]["mean"] == SCR_MDD
    tpp = b["tpp"]
    assert tpp["resolved"] and tpp["mdd"] == pytest.approx(2**0.5 * TPP_HW)
    r = next(r for r in tpp["rows"] if r["b"] == "matryoshka")
    assert r["separated"] and r["diff"] == pytest.approx(0.11 - 0.31)
    assert r["interval"] == "training seeds + test-example bootstrap (each side's interval)"
    assert tpp["answer"].startswith("contradicted — TPP at N = 20: below (separated) matryoshka")
    text = (tmp_path / "verdict.md").read_text()
    assert "**SCR: SCR at N = 20 cannot resolve a difference of 0.1" in text and "-0.650" not in text
    assert "| atm | 516 | 8 | 0.665 | 0.785 | 2.3 |" in text
    assert "# The paper's claims 3-5, at L0 64" in text


def test_claims_without_the_sections_say_not_measured():
    summary = {"atm": {"64": cell([0.1, 0.2, 0.3], FVU)}, "topk": {"64": cell([0.1, 0.2, 0.3], FVU)}}
    c = verdict.claims(summary, 64, ["topk"])
    assert c["probing"]["answer"] == c["sentiment"]["answer"] == "not measured"
    assert c["bias"]["answer"] == "SCR: not measured; TPP: not measured"
    verdict.claims_markdown(c)  # renders without the tables


def test_the_papers_claimed_numbers_are_the_eval_reports():
    from atmpipe.eval.metric import paper_values
    from atmpipe.eval.metrics import REGISTRY

    PAPER = paper_values(REGISTRY.values())
    for claim, value in verdict.PAPER_CLAIMS.items():
        assert PAPER[claim] == f"ATM {value:g}"
