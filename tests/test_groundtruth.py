"""The ground-truth arena (stages/groundtruth.py): the absorption measure against a hand count, and the whole
arena at a tiny size, end to end through SAELens's synthetic data, atmpipe stores and `atmpipe train`."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PEERS_PYTHON = ROOT / ".venv-peers" / "bin" / "python"


def _module(name: str):
    # stages/ on the path: the arena's spawned training workers import their function from it by name
    if str(ROOT / "stages") not in sys.path:
        sys.path.insert(0, str(ROOT / "stages"))
    return importlib.import_module(name)


synth = _module("groundtruth_synth")


def test_absorption_equals_a_hand_count():
    # Features: 0 parent of 1 and 2; 3 parent of 4; 5 free. Latents: feature f ↦ latent f (by decoder).
    children = {0: [1, 2], 3: [4]}
    match = torch.arange(6)
    truth = torch.tensor([
        # 0  1  2  3  4  5
        [1, 1, 0, 0, 0, 0],  # 0 with child 1; latent 0 silent, latent 1 fires: absorbed
        [1, 0, 1, 0, 0, 0],  # 0 with child 2; latent 0 fires: not absorbed
        [1, 0, 0, 0, 0, 0],  # 0 alone: not eligible
        [1, 1, 0, 1, 1, 0],  # 0 with 1, 3 with 4; both parents' latents silent, both children's fire: 2 absorbed
        [1, 0, 1, 0, 0, 1],  # 0 with 2; latent 0 silent, latent 2 silent, latent 1 fires (not active): not absorbed
        [0, 0, 0, 1, 1, 0],  # 3 with 4; latent 3 silent, latent 4 silent: not absorbed (missed, not absorbed)
    ], dtype=torch.bool)  # fmt: skip
    fires = torch.tensor([
        [0, 1, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0],
        [1, 0, 0, 0, 0, 0],
        [0, 1, 0, 0, 1, 0],
        [0, 1, 0, 0, 0, 1],
        [0, 0, 0, 0, 0, 0],
    ], dtype=torch.bool)  # fmt: skip
    got = synth.absorption(fires, truth, children, match)
    assert got["per_parent"] == {"0": (2, 4), "3": (1, 2)}
    assert (got["absorbed"], got["eligible"]) == (3, 6) and got["rate"] == pytest.approx(0.5)


def test_absorption_follows_the_matching_and_a_shared_latent_absorbs_nothing():
    children = {0: [1]}
    truth = torch.tensor([[1, 1], [1, 1]], dtype=torch.bool)
    fires = torch.tensor([[0, 1, 0], [1, 0, 0]], dtype=torch.bool)
    w_dec = torch.tensor([[0.0, 1.0], [0.6, 0.8], [1.0, 0.1]])  # latent 2 ~ feature 0, latent 0 ~ feature 1
    match = synth.match_latents(w_dec, torch.eye(2))
    assert match.tolist() == [2, 0]
    assert synth.match_latents(w_dec, torch.eye(2), live=torch.tensor([True, True, False])).tolist() == [1, 0]
    # Row 0: parent latent 2 silent, child latent 0 silent → no. Row 1: latent 2 silent, latent 0 fires → yes.
    assert synth.absorption(fires, truth, children, match)["absorbed"] == 1
    same = synth.absorption(fires, truth, children, torch.tensor([0, 0]))  # parent and child on one latent
    assert same["absorbed"] == 0 and same["eligible"] == 2


def test_hierarchy_children_and_depths_walk_every_level():
    tree = [{"feature_index": 0, "children": [
        {"feature_index": 1, "children": [{"feature_index": 3, "children": []}, {"feature_index": 4, "children": []}]},
        {"feature_index": 2, "children": []},
    ]}]  # fmt: skip
    assert synth.hierarchy_children(tree) == {0: [1, 2], 1: [3, 4]}
    assert synth.feature_depths(tree) == {0: 0, 1: 1, 3: 2, 4: 2, 2: 1}


TINY_PLAN = """
seeds = [0]
sizes = "{sizes}"
[data]
n_features = 24
d_model = 32             # no superposition, one small hierarchy: a well-sized TopK must find every feature
p_free = 0.06
magnitude_std = 0.2
train_tokens = 65_536
eval_tokens = 4096
[shapes.flat]
roots = 1
branching = 2
depth = 1
mutually_exclusive = 1.0
p_depth = [0.15, 0.06]
target_l0 = 2
[[cells]]
name = "flat"
shape = "flat"
d_sae = 24
[[methods]]
name = "topk"
recipes = ["stages/train-topk.toml"]
[[methods]]
name = "atm"
recipes = ["stages/train-atm.toml"]
"""
TINY_SIZES = "batch_size = 256\ntokens = 65_536\nlr = 1e-2\ncheckpoint_every = 32\nno_compile = true\n"


def test_tiny_arena_end_to_end_recovers_the_dictionary_and_resumes(tmp_path):
    if not PEERS_PYTHON.exists():
        pytest.fail(f"{PEERS_PYTHON} is missing: run `make peers` to create the SAELens venv for this test")
    arena = _module("groundtruth")
    (tmp_path / "sizes.toml").write_text(TINY_SIZES)
    (tmp_path / "plan.toml").write_text(TINY_PLAN.format(sizes=tmp_path / "sizes.toml"))
    args = ["--plan", str(tmp_path / "plan.toml"), "--work", str(tmp_path / "work"),
            "--results", str(tmp_path / "results"), "--peers", str(PEERS_PYTHON), "--workers", "1"]  # fmt: skip
    arena.main(args)
    results = json.loads((tmp_path / "results" / "results.json").read_text())
    topk, atm = (results["per_sae"]["flat"][m]["0"] for m in ("topk", "atm"))
    assert topk["mcc"] > 0.95  # the planted dictionary, recovered
    assert 1.0 < topk["l0"] <= 2.0  # k = 2 latents at most (fewer where a top-2 pre-activation is ≤ 0)
    eval_json = json.loads((tmp_path / "work" / "runs" / "flat" / "s0" / "topk" / "eval.json").read_text())
    counts = eval_json["absorption"]["per_parent"].values()
    assert topk["absorbed_pairs"] == [sum(a for a, _ in counts), sum(e for _, e in counts)]
    assert topk["absorption"] == pytest.approx(topk["absorbed_pairs"][0] / topk["absorbed_pairs"][1])
    assert 0 <= atm["masking"]["p_parents"] <= 1 and atm["masking"]["targeting"] == "adaptive"
    assert "masking" not in topk
    store = tmp_path / "work" / "stores" / "flat-s0.zarr"
    assert json.loads((store / "zarr.json").read_text())["attributes"]["atmpipe"]["d_model"] == 32
    meta = json.loads((tmp_path / "work" / "runs" / "flat" / "s0" / "topk" / "atmpipe.json").read_text())
    assert meta["hparams"]["k"] == 2 and meta["d_sae"] == 24
    table = (tmp_path / "results" / "table.md").read_text()
    assert f"| topk | {topk['l0']:.2f} | {topk['mcc']:.3f} |" in table
    # Resume: nothing finished is redone, and the same numbers come out.
    saved = {p: p.stat().st_mtime_ns for p in (tmp_path / "work").rglob("*.json") if "runs" in p.parts}
    arena.main(args)
    assert {p: p.stat().st_mtime_ns for p in saved} == saved
    again = json.loads((tmp_path / "results" / "results.json").read_text())
    assert again["per_sae"] == results["per_sae"]


def test_a_missing_peers_python_is_one_line_and_writes_nothing(tmp_path, capsys):
    arena = _module("groundtruth")
    with pytest.raises(SystemExit) as stop:
        arena.main(["--peers", str(tmp_path / "nope" / "python"), "--work", str(tmp_path / "work")])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "run `make peers`" in err and "\n" not in err
    assert not (tmp_path / "work").exists()
