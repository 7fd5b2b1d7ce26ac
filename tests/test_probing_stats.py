"""Sparse probing at resolving power, SCR over pairs and TPP: against slow references and constructed cases."""

import itertools

import numpy as np
import pandas as pd
import pytest
import torch
from test_eval_metrics import LinearSAE

from atmpipe.eval import data, interval
from atmpipe.eval.compute import probing, tpp
from atmpipe.eval.compute.bias import scr_summary, usable_pairs


def test_top_k_by_mean_difference_matches_a_loop():
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((60, 30)), rng.integers(0, 2, 60)
    X[:, 7] += 3 * y  # the clear winner
    slow = []
    for j in range(X.shape[1]):
        pos = [X[i, j] for i in range(len(y)) if y[i] == 1]
        neg = [X[i, j] for i in range(len(y)) if y[i] == 0]
        slow.append((-abs(sum(pos) / len(pos) - sum(neg) / len(neg)), j))
    for k in (1, 2, 5, 10, 20):
        assert probing.top_k_by_mean_diff(X, y, k).tolist() == [j for _, j in sorted(slow)[:k]]
    assert probing.top_k_by_mean_diff(X, y, 1).tolist() == [7]


def test_bootstrap_replicates_equal_explicit_resamples():
    rng = np.random.default_rng(1)
    values = rng.integers(0, 2, (3, 50)).astype(float)
    W = interval.bootstrap_weights(50, n_boot=20, seed=4)
    assert (W.sum(1) == 50).all()
    draws = np.random.default_rng(4).multinomial(50, np.full(50, 1 / 50), size=20)
    for b in range(20):
        resample = np.repeat(np.arange(50), draws[b])  # the examples drawn, with repeats
        assert interval.replicates(values, W)[b] == pytest.approx(values[:, resample].mean())


def test_interval_on_a_constructed_case():
    # One seed, p = 0.7 on 2000 examples: the bootstrap se is the binomial one, sqrt(p(1-p)/n).
    one = np.zeros((1, 2000))
    one[0, :1400] = 1
    iv = interval.task_interval(one)
    assert iv["mean"] == pytest.approx(0.7)
    assert iv["se_test_bootstrap"] == pytest.approx(np.sqrt(0.7 * 0.3 / 2000), rel=0.1)
    assert iv["sd_over_seeds"] == 0 and iv["half_width"] == pytest.approx(
        1.96 * iv["se_test_bootstrap"], rel=1e-3
    )
    # Three seeds at 0.6, 0.7, 0.8 on the same 1000 examples: the seed part is sd/sqrt(3) = 0.1/sqrt(3).
    three = np.zeros((3, 1000))
    for s, p in enumerate((0.6, 0.7, 0.8)):
        three[s, : int(p * 1000)] = 1
    iv = interval.task_interval(three)
    assert iv["sd_over_seeds"] == pytest.approx(0.1)
    expected = interval.Z95 * np.hypot(iv["se_test_bootstrap"], 0.1 / np.sqrt(3))
    assert iv["half_width"] == pytest.approx(expected) and iv["hi"] - iv["lo"] == pytest.approx(2 * expected)


def test_mean_interval_is_the_mean_of_the_task_replicates():
    rng = np.random.default_rng(2)
    tasks = [rng.integers(0, 2, (3, n)).astype(float) for n in (40, 70, 25)]
    got = interval.mean_interval(tasks, seeds=[5, 6, 7], n_boot=200)
    boots = [
        interval.replicates(v, interval.bootstrap_weights(v.shape[1], 200, s))
        for v, s in zip(tasks, (5, 6, 7), strict=True)
    ]
    mean_boot = np.mean(boots, axis=0)
    assert got["mean"] == pytest.approx(np.mean([v.mean() for v in tasks]))
    assert got["se_test_bootstrap"] == pytest.approx(np.std(mean_boot, ddof=1))
    assert got["n_tasks"] == 3


def test_sparse_probe_correctness_per_seed():
    rng = np.random.default_rng(3)
    X, y = rng.standard_normal((200, 12)), np.repeat([0, 1], 100)
    X[:, 4] += 4 * y
    Xt, yt = rng.standard_normal((80, 12)), np.repeat([0, 1], 40)
    Xt[:, 4] += 4 * yt
    got = probing.sparse_probe_correct(X, y, Xt, yt, ks=(1, 0), seeds=(0, 1, 2))
    assert got[1].shape == (3, 80) and got[1].mean() > 0.95 and got[0].mean() > 0.9
    # Each seed's training set is a class-stratified bootstrap resample: both classes, same sizes.
    idx = probing.train_resample(y, 1)
    assert np.bincount(y[idx]).tolist() == [100, 100] and not np.array_equal(
        idx, probing.train_resample(y, 2)
    )


def test_every_family_loads_from_the_shipped_data():
    assert len(data.TASKS) >= 40 and set(t.group for t in data.TASKS.values()) == set(data.GROUPS)
    assert sum(t.group == "sentiment" for t in data.TASKS.values()) == 7
    for name, task in data.TASKS.items():
        sp = data.task_split(task, 40, 20, 0)
        assert sp["train_labels"].count(1) == sp["train_labels"].count(0) == 20, name
        assert sp["test_labels"].count(1) == sp["test_labels"].count(0) == 10, name
        assert not set(sp["train_texts"]) & set(sp["test_texts"]), name
    for name, cs in data.CLASS_SETS.items():
        sp = data.class_split(cs, 10, 5, 0)
        assert np.bincount(sp["test_labels"]).tolist() == [5] * len(cs.classes), name
        assert np.bincount(sp["train_labels"]).tolist() == [10] * len(cs.classes), name


def test_scr_over_pairs_averages_pairs_and_bootstraps_people():
    def pair(base, oracle, abl, n=200):
        c = {
            k: (np.arange(n) < p * n).astype(np.int8)
            for k, p in (("base", base), ("oracle", oracle), ("20", abl))
        }
        return {"status": "ok", "_correct": c, "a_base": base, "a_oracle": oracle,
                "scr": {"20": (abl - base) / (oracle - base)}, "construction": {"n_test": n}}  # fmt: skip

    pairs = {"a/b": pair(0.6, 0.9, 0.75), "c/d": pair(0.5, 0.7, 0.7), "e/f": {"status": "undefined"}}
    out = scr_summary(pairs, (20,), 20, n_boot=400)
    assert out["n_pairs"] == 2 and out["pairs_used"] == ["a/b", "c/d"] and out["n_test"] == 400
    assert out["scr_headline"] == pytest.approx((0.5 + 1.0) / 2)
    assert out["a_base"] == pytest.approx(0.55) and out["a_oracle"] == pytest.approx(0.8)
    lo, hi = out["ci95_scr_headline"]
    assert lo < 0.75 < hi and out["mdd_headline"] == pytest.approx(np.sqrt(2) * (hi - lo) / 2)


def test_usable_pairs_need_every_cell():
    table = pd.DataFrame({"occupation": ["a"] * 6 + ["b"] * 6 + ["c"] * 6, "gender": ["male", "female"] * 9})
    table.loc[12:, "gender"] = "male"  # c has no women
    assert usable_pairs(table, ("a", "b", "c"), 3) == [("a", "b")]
    assert usable_pairs(table, ("a", "b", "c"), 4) == []


def test_tpp_formula_on_constructed_probes():
    # Two classes' probes on 4 test examples each; ablating class 0 costs probe 0 half its accuracy and
    # probe 1 a quarter; ablating class 1 costs probe 1 everything and probe 0 nothing.
    probes = [{"test": np.arange(4), "clean": np.ones(4)}, {"test": np.arange(4, 8), "clean": np.ones(4)}]
    correct = {"1": [[np.array([1, 1, 0, 0]), np.array([1, 1, 1, 0])], [np.ones(4), np.zeros(4)]]}
    got = tpp.tpp_replicates(probes, correct, 8, np.ones((1, 8)))["1"][0]
    assert got == pytest.approx(((0.5 - 0.25) + (1.0 - 0.0)) / 2)


def test_tpp_removes_each_class_from_its_own_probe_only():
    """Class c lives on latent c: ablating its top latent breaks probe c and leaves the others."""
    rng = np.random.default_rng(0)
    d, n_classes = 6, 3

    def make(n):
        y = np.repeat(np.arange(n_classes), n)
        R = rng.standard_normal((len(y), d)) * 0.3
        R[np.arange(len(y)), y] += 2.0
        return R.astype(np.float32), y

    (R_tr, y_tr), (R_te, y_te) = make(60), make(40)
    probes = tpp.class_probes(R_tr, y_tr, R_te, y_te, n_classes)
    assert all(p["clean"].mean() > 0.95 for p in probes)
    sae = LinearSAE(torch.eye(d), torch.eye(d))
    F_tr, F_te = (torch.relu(torch.tensor(R)).numpy() for R in (R_tr, R_te))
    correct = tpp.tpp_correct(sae, F_tr, F_te, R_te, y_tr, y_te, probes, (1,))
    score = tpp.tpp_replicates(probes, correct, len(y_te), np.ones((1, len(y_te))))["1"][0]
    assert score > 0.3
    for c, j in itertools.product(range(n_classes), repeat=2):
        if c != j:
            assert correct["1"][c][j].mean() > 0.9  # the other probes keep their accuracy
