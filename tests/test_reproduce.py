"""`make reproduce`: the driver's plan (PLAN_ONLY=1, nothing run), and the aggregate of real evaluations of tiny
SAEs trained on a store harvested from a tiny Gemma-3 (mean ± sd, the L0 check, the table, the figures)."""

from __future__ import annotations

import json
import os
import statistics
import struct
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from atmpipe.cli import app
from atmpipe.harvest import HarvestConfig, harvest
from atmpipe.train import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "stages"))
import frontier  # noqa: E402

METHODS = ["atm", "topk", "jumprelu", "relu", "matryoshka"]
K_METHODS = {"topk", "matryoshka"}  # set by k; the others steer toward a target L0
ABSORPTION_SEEDED = ("head", "seeds", "controls")  # the L0-64 groups, evaluated again at eval seeds 1 and 2


# --- the plan -------------------------------------------------------------------------------------


def plan(tmp_path: Path, **env) -> list[tuple[str, str, list[str]]]:
    run = subprocess.run(
        ["bash", "stages/reproduce.sh"],
        cwd=REPO,
        env={**os.environ, "PLAN_ONLY": "1", **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return [(n, s, c.split()) for n, s, c in frontier.plan_stages(run.stdout)]


def flag(cmd: list[str], name: str) -> list[str]:
    return [cmd[i + 1] for i, word in enumerate(cmd) if word == name]


def test_plan_lists_every_run_with_its_recipes_and_overrides_in_order(tmp_path):
    store, runs, results = tmp_path / "s.zarr", tmp_path / "runs", tmp_path / "results"
    stages = plan(tmp_path, STORE=str(store), RUNS=str(runs), RESULTS=str(results))
    names = [n for n, _, _ in stages]
    assert not runs.exists() and not results.exists()  # a plan writes nothing
    assert names[0] == "harvest" and flag(stages[0][2], "--out") == [str(store)]

    head = [f"train-{m}-L64-s0" for m in METHODS]
    seeds = [f"train-{m}-L64-s{s}" for s in (1, 2) for m in METHODS]
    level = [f"train-{m}-L{l0}-s0" for l0 in (16, 32, 128) for m in METHODS]
    controls = [f"train-atm-{v}-L64-s{s}" for s in (0, 1, 2) for v in ("uniform", "log", "r0.5")]
    long = ["train-atm-L64-s0-x4", "train-topk-L64-s0-x4"]
    groups = [("head", head), ("seeds", seeds), ("frontier", level), ("controls", controls), ("long", long)]
    # every group's eval; the L0-64 groups' absorption again at eval seeds 1 and 2
    reevals = {g: [f"eval-{g}-e1", f"eval-{g}-e2"] if g in ABSORPTION_SEEDED else [] for g, _ in groups}
    expected = [n for g, trains in groups for n in [*trains, f"eval-{g}", *reevals[g]]]
    # SAEBench's absorption beside ours on the five head SAEs, right after their evals: it checks the metric
    # every later group is read with
    expected.insert(expected.index("eval-head-e2") + 1, "crosscheck")
    assert names[1 : len(expected) + 1] == expected
    assert all(n.startswith("converge-") for n in names[len(expected) + 1 :])  # stages/converge.sh's part
    names = names[: len(expected) + 1]
    assert sum(n.startswith("train-") for n in names) == 41
    crosscheck = dict((n, c) for n, _, c in stages)["crosscheck"]
    saes = [str(runs / t.removeprefix("train-")) for t in head]
    assert "SAES=" + "\\ ".join(saes) in " ".join(crosscheck)  # one argument, spaces escaped by %q
    assert f"OUT={results / 'crosscheck'}" in crosscheck and "REPORT_ONLY=1" in crosscheck

    by_name = {n: c for n, _, c in stages}
    for name, trains in groups:
        evaluated = [w.removeprefix("--sae=") for w in by_name[f"eval-{name}"] if w.startswith("--sae=")]
        assert evaluated == [str(runs / t.removeprefix("train-")) for t in trains]
        assert flag(by_name[f"eval-{name}"], "--out") == [str(results / "evals" / name)]
        assert (
            flag(by_name[f"eval-{name}"], "--metrics") == [] and flag(by_name[f"eval-{name}"], "--seed") == []
        )
        for seed, stage in enumerate(reevals[name], start=1):  # absorption alone, the same SAEs, its own seed
            cmd = by_name[stage]
            assert [w.removeprefix("--sae=") for w in cmd if w.startswith("--sae=")] == evaluated
            assert flag(cmd, "--metrics") == ["absorption"] and flag(cmd, "--seed") == [str(seed)]
            assert flag(cmd, "--config") == ["stages/reproduce-eval.toml"]
            assert flag(cmd, "--out") == [str(results / "evals" / f"{name}-e{seed}")]
        for t in trains:
            run = frontier.parse_run(t.removeprefix("train-"))
            cmd = by_name[t]
            recipes = flag(cmd, "--config")
            assert recipes[:2] == [f"stages/train-{run['method']}.toml", "stages/reproduce-train.toml"]
            long = ["stages/reproduce-long.toml"] if run["tokens_multiplier"] > 1 else []
            assert len(recipes) == 2 + (run["variant"] != run["method"]) + len(long) and recipes[-1:] != [""]
            assert all((REPO / r).is_file() for r in recipes), recipes
            assert recipes[len(recipes) - len(long) :] == long  # the longer runs' tokens: a recipe too
            l0 = flag(cmd, "--k" if run["method"] in K_METHODS else "--target-l0")
            assert flag(cmd, "--target-l0" if run["method"] in K_METHODS else "--k") == []
            assert l0 == [str(run["l0_target"])] and flag(cmd, "--seed") == [str(run["seed"])]
            assert flag(cmd, "--store") == [str(store)] and flag(cmd, "--out") == [str(runs / run_name(run))]
            assert "--resume" in cmd and flag(cmd, "--tokens") == []
    tokens = [tomllib.loads((REPO / "stages" / f).read_text())["tokens"] for f in ("reproduce-train.toml", "reproduce-long.toml")]  # fmt: skip
    assert tokens[1] == 4 * tokens[0] == 4 * 2_097_152  # the -x4 in the names


def test_convergence_plan_trains_every_registered_method_at_three_lengths_with_eval_seeds(tmp_path):
    from atmpipe.sae import SAE_METHODS

    conv = tmp_path / "conv"
    stages = plan(tmp_path, CONV_RUNS=str(conv), CONV_RESULTS=str(tmp_path / "res"), CONV_STORE=str(tmp_path / "c.zarr"))  # fmt: skip
    by_name = {n: c for n, _, c in stages if n.startswith("converge-")}
    names = list(by_name)
    assert names[0] == "converge-harvest"
    assert flag(by_name["converge-harvest"], "--config") == ["stages/converge-harvest.toml"]
    methods = sorted(SAE_METHODS, key=lambda m: (m != "atm", m))  # a newly registered method is in
    length = [f"converge-train-{m}-L64-s0{x}" for x in ("", "-x4", "-x16") for m in methods]
    seeds = [f"converge-train-{m}-L64-s{s}{x}" for x in ("-x4", "-x16") for s in (1, 2) for m in methods]
    assert [n for n in names if n.startswith("converge-train-") and "-L64-" in n and "atm-" not in n.replace("atm-L", "")][: len(length + seeds)] == length + seeds  # fmt: skip
    for n in length + seeds:
        run = frontier.parse_run(n.removeprefix("converge-train-"))
        cmd = by_name[n]
        assert flag(cmd, "--tokens") == [str(2_097_152 * run["tokens_multiplier"])]
        assert flag(cmd, "--store") == [str(tmp_path / "c.zarr")] and flag(cmd, "--out") == [
            str(conv / run_name(run))
        ]
    for group in ("length", "seeds", "controls", "frontier"):  # three eval seeds, one output each
        outs = [flag(by_name[f"converge-eval-{group}-e{s}"], "--out")[0] for s in (0, 1, 2)]
        assert outs == [str(tmp_path / "res" / "evals" / g) for g in (group, f"{group}-e1", f"{group}-e2")]
        assert [flag(by_name[f"converge-eval-{group}-e{s}"], "--seed") for s in (0, 1, 2)] == [
            ["0"],
            ["1"],
            ["2"],
        ]
    cross = " ".join(by_name["converge-crosscheck"])
    assert "--words\\ 8000\\ --floor\\ 400" in cross and "--seeds\\ 0\\,1\\,2" in cross  # as %q writes it
    assert all(f"{m}-L64-s0-x16" in cross for m in methods)
    controls = [n for n in names if n.startswith("converge-train-atm-") and "-L64-" in n and n.split("-")[3] in ("uniform", "log", "r0.5")]  # fmt: skip
    assert len(controls) == 9 and all(n.endswith("-x16") for n in controls)
    assert sum(n.startswith("converge-train-") and "-L64-" not in n for n in names) == 3 * len(methods)
    # over budget: the controls cut to seed 0 first, the frontier at the longest length left out
    cut = [n for n, _, _ in plan(tmp_path, CONTROL_SEEDS="0", FRONTIER_LONG="0")]
    assert sum("-uniform-" in n for n in cut if n.startswith("converge-train")) == 1
    assert not any(n.startswith("converge-eval-frontier") for n in cut)
    assert not any(n.startswith("converge-") for n, _, _ in plan(tmp_path, CONVERGE="0"))


def run_name(run: dict) -> str:
    times = run["tokens_multiplier"]
    return f"{run['variant']}-L{run['l0_target']}-s{run['seed']}" + (f"-x{times}" if times > 1 else "")


def test_absorption_eval_seeds_can_be_left_out_and_matryoshka_is_set_by_k_in_both_parts(tmp_path):
    names = [n for n, _, _ in plan(tmp_path, ABSORPTION_SEEDS="", CONVERGE="0")]
    assert "eval-head" in names and not [n for n in names if n.startswith("eval-") and "-e" in n[5:]]
    matryoshka = [(n, c) for n, _, c in plan(tmp_path) if "train-matryoshka-" in n]
    # 2M: 4 levels + 2 seeds; convergence: 3 lengths + 2 × 2 seeds + 3 levels
    assert len(matryoshka) == 6 + 10
    for name, cmd in matryoshka:
        level = str(frontier.parse_run(name.split("train-", 1)[1])["l0_target"])
        assert flag(cmd, "--k") == [level] and flag(cmd, "--target-l0") == [], name


def test_probing_scr_and_tpp_can_be_kept_to_the_l0_64_groups(tmp_path, capsys):
    stages = plan(tmp_path, LABELLED_GROUPS="head seeds controls", CONVERGE="0")
    by_name = {n: c for n, _, c in stages}
    recipe = tomllib.loads((REPO / "stages" / "reproduce-eval.toml").read_text())["metrics"].split(",")
    rest = [m for m in recipe if m not in frontier.LABELLED]
    for group in ("frontier", "long"):  # the rest of the recipe's metrics, in its order
        assert flag(by_name[f"eval-{group}"], "--metrics") == ["\\,".join(rest)]  # as %q writes it
    assert all(flag(by_name[f"eval-{g}"], "--metrics") == [] for g in ("head", "seeds", "controls"))
    seconds = json.loads((REPO / "stages" / "reproduce-budget.json").read_text())
    rows = {n: s for n, _, s, _ in frontier.budget_seconds("\n".join("\t".join([n, s, " ".join(c)]) for n, s, c in stages), seconds)}  # fmt: skip
    per_sae = seconds["eval_s"]["per_sae"]
    assert rows["eval-frontier"] == 15 * per_sae and rows["eval-long"] == 2 * per_sae  # no labelled cost


def test_plan_marks_finished_stages_done(tmp_path):
    runs = tmp_path / "runs"
    (runs / "done").mkdir(parents=True)
    (runs / "done" / "train-topk-L64-s0").touch()
    (runs / "topk-L64-s0").mkdir()
    (runs / "topk-L64-s0" / "atmpipe.json").write_text("{}")
    (runs / "done" / "train-relu-L64-s0").touch()  # a marker without its output: not done
    status = {n: s for n, s, _ in plan(tmp_path, RUNS=str(runs), STORE=str(tmp_path / "s.zarr"))}
    assert status["train-topk-L64-s0"] == "done"
    assert status["train-relu-L64-s0"] == "todo" and status["train-atm-L64-s0"] == "todo"


def test_budget_adds_the_unfinished_stages(tmp_path, capsys):
    text = "harvest\tdone\tx\ntrain-atm-L64-s0\ttodo\tx\ntrain-atm-uniform-L64-s0\ttodo\tx\n"
    text += "train-topk-L64-s0-x4\ttodo\tx\neval-head\ttodo\ta --sae=1 --sae=2 --sae=3\n"
    text += "train-atm-L64-s0-x4\ttodo\tx\neval-long\ttodo\ta --sae=1 --sae=2\n"
    seconds = {
        "train_s": {"atm": 600, "topk": 150, "atm-uniform": 700, "atm-x4": 2000},  # atm-x4: its whole run
        "eval_s": {"first": 300, "per_sae": 60},
    }
    hours = frontier.print_budget(text, seconds)
    assert hours == pytest.approx((600 + 700 + 4 * 150 + 300 + 3 * 60 + 2000 + 2 * 60) / 3600)
    assert "within 16 h" in capsys.readouterr().out


def test_budget_pays_each_eval_part_once_per_eval_seed_and_marks_estimates(tmp_path, capsys):
    recipe = "--config stages/reproduce-eval.toml"  # its metrics: every one, probing, SCR and TPP among them
    text = f"eval-head\ttodo\tatmpipe eval {recipe} --sae=a --sae=b\n"
    text += f"eval-head-e1\ttodo\tatmpipe eval {recipe} --metrics absorption --seed 1 --sae=a --sae=b\n"
    text += f"eval-seeds\ttodo\tatmpipe eval {recipe} --sae=c\n"
    text += f"eval-seeds-e1\ttodo\tatmpipe eval {recipe} --metrics absorption --seed 1 --sae=c\n"
    text += f"converge-eval-x-e1\ttodo\tatmpipe eval {recipe} --seed 1 --sae=d\n"  # seed 1's labelled texts
    text += "eval-core\ttodo\tatmpipe eval --metrics core --sae=e\n"  # no labelled texts, no absorption
    seconds = {
        "train_s": {},
        "eval_s": {"first": {"absorption": 1000, "other": 100, "labelled": 3000}, "per_sae": 50,
                   "per_sae_labelled": 200, "per_sae_absorption_only": 20},
        "estimated": ["eval_s.first.labelled", "eval_s.per_sae_labelled"],
    }  # fmt: skip
    rows = {n: (s, lm) for n, _, s, lm in frontier.budget_seconds(text, seconds)}
    assert rows["eval-head"] == (1000 + 100 + 3000 + 2 * 250, 4100)  # seed 0's LM parts, all of them
    assert rows["eval-head-e1"] == (1000 + 2 * 20, 1000)  # seed 1: its absorption prompts only
    assert rows["eval-seeds"] == (250, 0) and rows["eval-seeds-e1"] == (20, 0)  # paid already
    assert rows["converge-eval-x-e1"] == (100 + 3000 + 250, 3100)  # seed 1's other parts, now
    assert rows["eval-core"] == (50, 0)
    hours = frontier.print_budget(text, seconds)
    out = capsys.readouterr().out
    assert hours == pytest.approx(sum(s for s, _ in rows.values()) / 3600)
    labelled = 3000 + 3 * 200 + 3000 + 200  # what the two estimated inputs contribute
    assert f"of which {labelled / 3600:.2f} h rest on estimates, not measurements" in out
    line = {ln.split()[0]: ln.split()[-1] for ln in out.splitlines()[1:] if ln.startswith(("eval", "conv"))}
    assert line["eval-head"] == "estimate" and line["eval-head-e1"] == "measured"
    assert line["eval-core"] == "measured" and line["eval-seeds"] == "estimate"
    with pytest.raises(ValueError, match="estimated input eval_s.first is a table; name its entries"):
        frontier.without_estimates(seconds | {"estimated": ["eval_s.first"]})


def test_the_budget_file_prices_every_stage_of_the_plan(tmp_path, capsys):
    seconds = json.loads((REPO / "stages" / "reproduce-budget.json").read_text())
    text = subprocess.run(["bash", "stages/reproduce.sh"], cwd=REPO, env={**os.environ, "PLAN_ONLY": "1", "RUNS": str(tmp_path)},
                          capture_output=True, text=True, check=True).stdout  # fmt: skip
    frontier.print_budget(text, seconds)  # every method, variant and estimated input is found
    assert "rest on estimates" in capsys.readouterr().out


def test_run_names_parse_and_must_agree_with_the_runs_metadata():
    assert frontier.parse_run("atm-uniform-L64-s1") == {
        "variant": "atm-uniform",
        "method": "atm",
        "series": "atm-uniform",
        "l0_target": 64,
        "seed": 1,
        "tokens_multiplier": 1,
    }
    assert frontier.parse_run("atm-r0.5-L64-s2")["variant"] == "atm-r0.5"
    assert frontier.parse_run("topk-L64-s0-x4")["series"] == "topk-x4"
    assert frontier.parse_run("topk") is None  # an SAE that is not the experiment's
    with pytest.raises(ValueError, match="named seed 1 but trained with seed 0"):
        frontier.parse_run("atm-L64-s1", {"train_config": {"seed": 0}})


# --- the aggregate, on real evaluations ------------------------------------------------------------

D_MODEL, LAYER = 32, 1
TINY_RUNS = {  # name → (method, hparams); L0 levels 4 and 8, head 8
    "topk-L4-s0": ("topk", {"k": 4}),
    "topk-L8-s0": ("topk", {"k": 8}),
    "topk-L8-s1": ("topk", {"k": 8}),
    "topk-L8-s2": ("topk", {"k": 8}),
    "relu-L8-s0": ("relu", {"l1": 0.3, "target_l0": 8.0}),
    "atm-r0.5-L8-s0": ("atm", {"l1": 0.3, "target_l0": 8.0, "r": 0.5, "warmup_steps": 2}),
    "topk-L8-s0-x4": ("topk", {"k": 8}),
}
GROUPS = {"head": ["topk-L8-s0", "relu-L8-s0"], "rest": [n for n in TINY_RUNS if n not in ("topk-L8-s0", "relu-L8-s0")]}  # fmt: skip


@pytest.fixture(scope="module")
def evaluated(tiny_checkpoints, tmp_path_factory):
    """A results dir whose evals/<group>/results.json come from `atmpipe eval` on SAEs trained for real."""
    root = tmp_path_factory.mktemp("reproduce")
    model = str(tiny_checkpoints["gemma3"])
    store = harvest(
        HarvestConfig(model=model, layers=[LAYER], tokens=32 * 64, eval_tokens=32 * 8, context_size=32,
                      batch_size=4, out=str(root / "s.zarr"), chunk_tokens=128, shard_tokens=256)
    )  # fmt: skip
    for name, (method, hparams) in TINY_RUNS.items():
        run = frontier.parse_run(name)
        train(
            TrainConfig(store=str(store), method=method, d_sae=8 * D_MODEL, batch_size=128, lr=3e-3,
                        tokens=128 * 8 * run["tokens_multiplier"], seed=run["seed"], hparams=hparams,
                        out=str(root / "runs" / name), checkpoint_every=100, device="cpu")
        )  # fmt: skip
    results = root / "results"
    for group, names in GROUPS.items():
        saes = [f"--sae={root / 'runs' / n}" for n in names]
        out = results / "evals" / group
        invoked = CliRunner().invoke(
            app, ["eval", *saes, "--metrics", "core", "--splice-windows", "2", "--out", str(out)]
        )
        assert invoked.exit_code == 0, invoked.output
    return results


def eval_values(results: Path, metric: str) -> dict[str, float]:
    values = {}
    for f in (results / "evals").glob("*/results.json"):
        values |= {n: r["core"][metric] for n, r in json.loads(f.read_text())["results"].items()}
    return values


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_aggregate_of_real_evals_matches_hand_computations(evaluated):
    payload = frontier.write(evaluated, head=8)
    fvu, l0 = eval_values(evaluated, "fvu"), eval_values(evaluated, "l0")
    assert set(payload["runs"]) == set(TINY_RUNS)
    long, once = payload["runs"]["topk-L8-s0-x4"], payload["runs"]["topk-L8-s0"]
    assert long["tokens_seen"] == 4 * once["tokens_seen"] == 4 * 128 * 8  # read from the runs' metadata
    assert long["epochs"] == pytest.approx(4 * once["epochs"]) and long["epochs"] > 1  # passes over the store
    assert payload["runs"]["relu-L8-s0"]["group"] == "head"

    cell = payload["summary"]["topk"]["8"]
    seeds = [fvu[f"topk-L8-s{s}"] for s in (0, 1, 2)]
    assert cell["seeds"] == [0, 1, 2] and cell["metrics"]["core.fvu"]["n"] == 3
    assert cell["metrics"]["core.fvu"]["mean"] == pytest.approx(sum(seeds) / 3)
    mean = sum(seeds) / 3
    assert cell["metrics"]["core.fvu"]["sd"] == pytest.approx(
        (sum((v - mean) ** 2 for v in seeds) / 2) ** 0.5
    )
    assert cell["metrics"]["core.fvu"]["sd"] == pytest.approx(statistics.stdev(seeds))
    single = payload["summary"]["atm-r0.5"]["8"]["metrics"]["core.fvu"]
    assert single == {"mean": fvu["atm-r0.5-L8-s0"], "sd": None, "n": 1, "values": [fvu["atm-r0.5-L8-s0"]]}
    assert set(payload["summary"]) == {"topk", "relu", "atm-r0.5", "topk-x4"}

    check = payload["l0_match"]
    for name, v in check["runs"].items():
        target = frontier.parse_run(name)["l0_target"]
        assert v["relative"] == pytest.approx(l0[name] / target - 1)
    outside = sorted(n for n in TINY_RUNS if abs(l0[n] / frontier.parse_run(n)["l0_target"] - 1) > 0.05)
    assert check["outside"] == outside and check["matched"] == (not outside)
    assert check["levels"]["4"] == (abs(l0["topk-L4-s0"] / 4 - 1) <= 0.05)
    assert all(
        abs(l0[n] / frontier.parse_run(n)["l0_target"] - 1) < 1e-9 for n in TINY_RUNS if n.startswith("topk")
    )

    table = (evaluated / "table.md").read_text()
    assert "| metric | topk | relu | atm-r0.5 | topk-x4 | paper's (Gemma-2-2b) |" in table
    fvu_row = next(line for line in table.splitlines() if line.startswith("| core.fvu |"))
    assert (
        f"{mean:.4g} ± {statistics.stdev(seeds):.2g} (3)" in fvu_row
        and f"{fvu['relu-L8-s0']:.4g} (1)" in fvu_row
    )
    assert "| core.cossim |" in table and "ATM 0.9727" in table  # the paper's, in its own column

    # core only: the FVU and CE figures exist; absorption and masking ones are left out, not drawn empty
    assert payload["figures"] == ["ce_score_vs_l0.png", "fvu_vs_l0.png"]
    # no plain ATM series here: only the r = 0.5 control against its ReLU + L1 base, on the core metrics
    pairs = {(r["a"], r["b"], r["metric"]) for r in payload["comparisons"]}
    assert pairs == {("atm-r0.5", "relu", "core.fvu"), ("atm-r0.5", "relu", "core.ce_loss_score")}
    assert (evaluated / "verdict.md").is_file()
    for png in payload["figures"]:
        assert png_size(evaluated / png) == (800, 500)
    assert not (evaluated / "full_absorption_vs_l0.png").exists()
    assert not (evaluated / "absorption_vs_fvu_l0_8.png").exists()
    assert json.loads((evaluated / "results.json").read_text()) == json.loads(json.dumps(payload))


def test_absorption_ci_and_masking_diagnostics_are_used_where_present(evaluated, tmp_path):
    """Sections a newer eval adds (absorption's CI, ATM's masking diagnostics) flow into the summary and
    figures; the values are the real eval's, with the two sections added by hand."""
    results = tmp_path / "results"
    for f in (evaluated / "evals").glob("*/results.json"):
        payload = json.loads(f.read_text())
        for i, (name, r) in enumerate(sorted(payload["results"].items())):
            r["absorption"] = {"status": "ok", "mean_full_absorption": 0.1 + i / 100,
                               "mean_absorption_fraction": 0.2, "ci95_full_absorption": [0.05, 0.15 + i / 100]}  # fmt: skip
            if name.startswith("atm"):
                r["masking"] = {"mean_masked_fraction": 0.3, "frac_latents_masked": 0.5}
        sample = {"words": 8000, "kind": "uniform random", "seed": 0}
        payload["shared"]["absorption"] = {"protocol": "saebench-0.6", "sample": sample, "n_words_test": 2500}
        (results / "evals" / f.parent.name).mkdir(parents=True)
        (results / "evals" / f.parent.name / "results.json").write_text(json.dumps(payload))
    payload = frontier.write(results, head=8)
    cell = payload["summary"]["topk"]["8"]
    assert cell["metrics"]["absorption.mean_full_absorption"]["n"] == 3
    his = [payload["runs"][f"topk-L8-s{s}"]["ci95"]["absorption.mean_full_absorption"][1] for s in (0, 1, 2)]
    assert cell["ci95"]["absorption.mean_full_absorption"] == pytest.approx([0.05, sum(his) / 3])
    row = next(r for r in (results / "table.md").read_text().splitlines() if "mean_full_absorption" in r)
    assert f"[CI 0.05–{sum(his) / 3:.3g}]" in row
    assert (
        "Absorption: protocol saebench-0.6, 8000 words (uniform random, seed 0), 2500 test words"
        in (results / "table.md").read_text()
    )
    assert payload["evals"]["head"]["shared"]["absorption"]["sample"]["words"] == 8000
    assert payload["summary"]["atm-r0.5"]["8"]["metrics"]["masking.mean_masked_fraction"]["mean"] == 0.3
    assert {"full_absorption_vs_l0.png", "absorption_fraction_vs_l0.png", "masking_diagnostics.png"} <= set(
        payload["figures"]
    )
    assert "absorption_vs_fvu_l0_8.png" in payload["figures"]
    assert png_size(results / "masking_diagnostics.png") == (800, 500)


def test_plan_for_gemma_2_2b_on_a_gpu_names_its_own_store_runs_and_results(tmp_path):
    stages = plan(tmp_path, MODEL="gemma-2-2b", LAYER="12")
    harvest_cmd = stages[0][2]
    assert flag(harvest_cmd, "--model") == ["gemma-2-2b"] and flag(harvest_cmd, "--layer") == ["12"]
    assert flag(harvest_cmd, "--out") == ["cache/reproduce-gemma-2-2b-l12.zarr"]
    by_name = {n: c for n, _, c in stages}
    assert flag(by_name["train-atm-L64-s0"], "--out") == ["runs/reproduce/gemma-2-2b-l12/atm-L64-s0"]
    assert flag(by_name["eval-head"], "--out") == ["results/gemma-2-2b-l12/evals/head"]
