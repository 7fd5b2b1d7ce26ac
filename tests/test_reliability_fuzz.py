"""Generated bad inputs (Hypothesis): every one ends in a correct result or one line and exit code 2.

Four targets, each mutated by seeded, replayable strategies (derandomize=True, no example database):
- a store's zarr.json files and its `atmpipe` root attributes (missing keys, wrong types, NaN and huge
  numbers, wrong shapes and schema versions, truncated or garbage bytes), read by `info`, `verify` and
  `train --allow-partial`;
- an SAE directory's cfg.json, atmpipe.json, safetensors header and tensors (wrong dtype or shape, NaN,
  missing or extra tensors, truncated files), loaded by `eval`;
- train recipe TOML files and --hparam values, run by `train`;
- a run directory as `train --resume` reads it: metrics.jsonl, the checkpoint's state.json and tensors.

The CLI runs in-process (one import for all cases). A case passes when the command succeeds with a
correct result, or exits 2 with exactly one `error:` line, no traceback, and every input file unchanged.
Examples per target: ATMPIPE_FUZZ_EXAMPLES (`make reliability` runs 250 per target; pytest a few).
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import struct
import tempfile
import traceback
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_helpers import tally, tree_digest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from atmpipe.cli import app
from atmpipe.store import write_arrays_store

EXAMPLES = int(os.environ.get("ATMPIPE_FUZZ_EXAMPLES", "12"))
FUZZ = settings(
    max_examples=EXAMPLES, derandomize=True, database=None, deadline=None, print_blob=True,
    suppress_health_check=list(HealthCheck),
)  # fmt: skip
LAYER, D = 1, 16
SAE_FILES = ("cfg.json", "atmpipe.json", "sae_weights.safetensors")
outcomes: dict[str, Counter] = {}


# --- the check every case goes through ------------------------------------------------------------


def run_cli(target: str, args: list, inputs: list[Path], ok_codes=(0,)) -> tuple[int, str]:
    """Run the CLI; assert the outcome is a success (`ok_codes`) or one clean refusal that changed no
    input. Returns (exit code, the error line or "")."""
    before = {p: tree_digest(p) if p.is_dir() else p.read_bytes() for p in inputs if p.exists()}
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "400"})
    crash = result.exception if not isinstance(result.exception, SystemExit) else None
    assert crash is None, "".join(traceback.format_exception(crash))
    assert "Traceback" not in result.output, result.output
    line = ""
    if result.exit_code not in ok_codes:
        assert result.exit_code == 2, (result.exit_code, result.output)
        errors = [x for x in result.stderr.splitlines() if x.startswith("error: ")]
        assert len(errors) == 1 and result.stderr.count("error:") == 1, result.stderr
        line = errors[0]
        after = {p: tree_digest(p) if p.is_dir() else p.read_bytes() for p in inputs if p.exists()}
        # (a resumed run that diverges is a run that stopped, not a refused input: its log moved on)
        assert after == before or line.startswith("error: loss is "), (
            f"a refused command changed its inputs: {line}"
        )
    outcomes.setdefault(target, Counter())["refused" if line else "accepted"] += 1
    return result.exit_code, line


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    yield
    for target, counts in outcomes.items():
        print(f"fuzzed {target}: {sum(counts.values())} ({dict(counts)})")


# --- mutation strategies --------------------------------------------------------------------------

HUGE = [2**31, 2**63, 2**64 + 1, 10**30, -(2**63), 1e308, -1e308, 1e-320]
LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 70),
    st.sampled_from(HUGE),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.integers(-2, 40), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(-1, 3), max_size=2),
)


def paths_of(doc, prefix=()) -> list[tuple]:
    """Every key path into a JSON document (containers included)."""
    out = [prefix]
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else []
    for k, v in items:
        out += paths_of(v, (*prefix, k))
    return out


@st.composite
def json_edits(draw, doc, focus: tuple = ()):
    """1-3 edits of a JSON document: delete, replace or retype a value, add an unknown key; the paths
    under `focus` are drawn more often."""
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in paths_of(doc) if p]
        focused = [p for p in paths if p[: len(focus)] == focus] or paths
        if not paths:
            return draw(LEAF)
        path = draw(st.sampled_from(focused if draw(st.integers(0, 3)) else paths))
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "replace", "delete", "add", "shape"]))
        if action == "delete":
            del parent[path[-1]]
        elif action == "add" and isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=6))] = draw(LEAF)
        elif action == "shape" and isinstance(parent[path[-1]], list):
            parent[path[-1]] = draw(st.lists(st.integers(-2, 70), max_size=3))
        else:
            parent[path[-1]] = draw(LEAF)
    return doc


@st.composite
def byte_edits(draw, raw: bytes) -> bytes:
    """Truncate, flip a byte, or replace with garbage."""
    kind = draw(st.sampled_from(["truncate", "flip", "garbage", "empty"]))
    if kind == "truncate" and raw:
        return raw[: draw(st.integers(0, len(raw) - 1))]
    if kind == "flip" and raw:
        at = draw(st.integers(0, len(raw) - 1))
        return raw[:at] + bytes([raw[at] ^ draw(st.integers(1, 255))]) + raw[at + 1 :]
    if kind == "garbage":
        return draw(st.binary(max_size=64))
    return b""


@st.composite
def json_file_edit(draw, raw: bytes, focus: tuple = ()) -> bytes:
    """A JSON file's new bytes: mostly a structural edit, sometimes a byte-level one."""
    if draw(st.integers(0, 4)) == 0:
        return draw(byte_edits(raw))
    return json.dumps(draw(json_edits(json.loads(raw), focus))).encode()


@st.composite
def safetensors_edit(draw, path: Path) -> bytes:
    """A safetensors file's new bytes: its JSON header edited, or a tensor of the wrong dtype or shape,
    non-finite values, missing or extra, or the bytes cut short."""
    raw = path.read_bytes()
    kind = draw(st.sampled_from(["header", "tensor", "tensor", "bytes"]))
    if kind == "bytes":
        return draw(byte_edits(raw))
    if kind == "header":
        n = struct.unpack("<Q", raw[:8])[0]
        header = draw(json_edits(json.loads(raw[8 : 8 + n])))
        new = json.dumps(header).encode()
        return struct.pack("<Q", len(new)) + new + raw[8 + n :]
    tensors = load_file(str(path))
    name = draw(st.sampled_from(sorted(tensors)))
    t = tensors[name]
    change = draw(st.sampled_from(["dtype", "shape", "nan", "inf", "drop", "extra"]))
    if change == "dtype":
        tensors[name] = t.to(draw(st.sampled_from([torch.float16, torch.float64, torch.int32, torch.bool])))
    elif change == "shape":
        tensors[name] = torch.zeros(draw(st.lists(st.integers(0, 5), max_size=3)))
    elif change in ("nan", "inf") and t.is_floating_point() and t.numel():
        flat = t.clone().flatten()
        flat[draw(st.integers(0, t.numel() - 1))] = math.nan if change == "nan" else -math.inf
        tensors[name] = flat.reshape(t.shape)
    elif change == "drop":
        del tensors[name]
    else:
        tensors[draw(st.text("abcxyz_", min_size=1, max_size=6))] = torch.ones(2)
    out = path.with_name(path.name + ".fuzz")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out))
    data = out.read_bytes()
    out.unlink()
    return data


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A store, an SAE and an unfinished run (killed after step 4 of 6), the originals every case copies."""
    from atmpipe.sae import SAEConfig, make_sae

    root = tmp_path_factory.mktemp("fuzz")
    rng = np.random.default_rng(0)
    splits = {}
    for name, n in (("train", 1024), ("eval", 256)):
        splits[name] = {
            "acts": rng.normal(size=(n, D)).astype(np.float32),
            "tokens": rng.integers(1, 300, n),
            "positions": np.arange(n) % 64,
            "bos": np.arange(n) % 64 == 0,
        }
    store = write_arrays_store(root / "s.zarr", splits, layer=LAYER, chunk_tokens=128, shard_tokens=256)
    torch.manual_seed(0)
    cfg = SAEConfig(
        "relu", D, 32, {}, model_name="synthetic", layer=LAYER, hook_name="blocks.1.hook_resid_post"
    )
    make_sae(cfg).save(root / "sae", {})
    run = root / "run"
    (root / "log-every-step.toml").write_text("log_every = 1\n")
    args = ["train", "--config", root / "log-every-step.toml", "--store", store.path, "--method", "relu", "--d-sae", 32, "--batch-size", 64, "--tokens",
            64 * 6, "--device", "cpu", "--checkpoint-every", 2, "--no-compile", "--out", run]  # fmt: skip
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    shutil.copy(run / "sae_weights.safetensors", root / "finished.safetensors")
    for name in SAE_FILES:  # as a kill after the checkpoint of step 4 leaves it
        (run / name).unlink()
    shutil.rmtree(run / "checkpoints" / "step_00000006")
    return {
        "root": root,
        "store": store.path,
        "sae": root / "sae",
        "run": run,
        "finished": root / "finished.safetensors",
    }


class Case:
    """A fresh copy of the originals for one generated case, removed afterwards."""

    def __init__(self, base: dict, *names: str):
        self.dir = Path(tempfile.mkdtemp(dir=base["root"], prefix="case-"))
        for name in names:
            shutil.copytree(base[name], self.dir / Path(base[name]).name)

    def __enter__(self):
        return self.dir

    def __exit__(self, *exc):
        shutil.rmtree(self.dir)


def store_files(store: Path) -> list[str]:
    return sorted(str(p.relative_to(store)) for p in store.rglob("zarr.json"))


# --- targets --------------------------------------------------------------------------------------


@FUZZ
@given(data=st.data())
def test_fuzzed_store_metadata_is_read_or_refused_in_one_line(base, data):
    names = store_files(Path(base["store"]))
    name = data.draw(st.sampled_from(["zarr.json"] * len(names) + names), label="file")
    with Case(base, "store") as case:
        store = case / "s.zarr"
        raw = (store / name).read_bytes()
        focus = ("attributes", "atmpipe") if name == "zarr.json" else ()
        (store / name).write_bytes(data.draw(json_file_edit(raw, focus), label="new bytes"))
        run_cli("store zarr.json and attributes", ["info", store], [store])
        run_cli("store zarr.json and attributes", ["verify", store], [store], ok_codes=(0, 1))
        code, _ = run_cli("store zarr.json and attributes", ["train", "--store", store, "--method", "relu",
                          "--d-sae", 32, "--batch-size", 64, "--tokens", 64, "--device", "cpu", "--no-compile",
                          "--allow-partial", "--out", case / "run"], [store])  # fmt: skip
        if code == 0:
            assert (case / "run" / "sae_weights.safetensors").exists()
    tally("fuzzed inputs: store zarr.json and atmpipe attributes")


@FUZZ
@given(data=st.data())
def test_fuzzed_sae_directory_is_loaded_or_refused_in_one_line(base, data):
    from atmpipe.sae import SAE

    name = data.draw(st.sampled_from(SAE_FILES), label="file")
    with Case(base, "sae", "store") as case:
        sae = case / "sae"
        if name.endswith(".json"):
            new = data.draw(json_file_edit((sae / name).read_bytes()), label="new bytes")
        else:
            new = data.draw(safetensors_edit(sae / name), label="new bytes")
        (sae / name).write_bytes(new)
        args = [
            "eval",
            "--sae",
            sae,
            "--store",
            case / "s.zarr",
            "--metrics",
            "core",
            "--out",
            case / "report",
        ]
        _, line = run_cli("SAE directory", args, [sae, case / "s.zarr"])
        # The SAE is loaded before the model, which this synthetic store names but nobody can load: an
        # accepted SAE shows as that refusal, and must load with finite weights of the right shapes.
        # (or, when the edit removed its model or hook, as eval asking for --model or --layer)
        if line.startswith(("error: unknown model '", "error: the SAEs do not record their ")):
            loaded = SAE.load(sae)
            shapes = loaded.weight_shapes()
            for key, value in loaded.state_dict().items():
                assert torch.isfinite(value.float()).all(), key
                if key in shapes:
                    assert tuple(value.shape) == shapes[key], key
        else:  # names the SAE's file, or the hyper-parameter of atmpipe.json it refuses
            assert str(sae) in line or line.startswith("error: hyper-parameter "), line
    tally("fuzzed inputs: SAE cfg.json, atmpipe.json, safetensors")


TOML_KEYS = {
    "method": st.sampled_from(["relu", "topk", "jumprelu", "atm", "", "RELU", "none"]),
    "layer": st.one_of(st.integers(-2, 3), st.sampled_from(HUGE)),
    "d_sae": st.integers(-2, 48),
    "expansion": st.integers(-2, 3),
    "k": st.one_of(st.integers(-2, 40), st.sampled_from(HUGE)),
    "lr": st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(HUGE)),
    "batch_size": st.integers(-2, 128),
    "tokens": st.integers(-64, 256),
    "seed": st.one_of(st.integers(-5, 5), st.sampled_from(HUGE)),
    "warmup_steps": st.one_of(st.integers(-5, 5), st.sampled_from(HUGE)),
    "warmup_frac": st.floats(allow_nan=True, allow_infinity=True),
    "decay_frac": st.floats(allow_nan=True, allow_infinity=True),
    "grad_clip": st.floats(allow_nan=True, allow_infinity=True),
    "buffer_chunks": st.integers(-2, 8),
    "checkpoint_every": st.integers(-2, 4),
    "log_every": st.integers(-2, 4),
    "latent_path": st.sampled_from(["auto", "sparse", "dense", "", "x"]),
    "l1": st.floats(allow_nan=True, allow_infinity=True),
    "target_l0": st.floats(allow_nan=True, allow_infinity=True),
}


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    return "null"  # not TOML: the file is refused as invalid


@st.composite
def recipes(draw) -> str:
    """A train recipe: known keys with generated values (some of the wrong type), maybe an unknown key,
    sometimes cut short or with garbage."""
    keys = draw(st.lists(st.sampled_from(sorted(TOML_KEYS)), unique=True, max_size=5))
    values = {k: draw(st.one_of(TOML_KEYS[k], TOML_KEYS[k], LEAF)) for k in keys}
    if draw(st.integers(0, 5)) == 0:
        values[draw(st.text("abcdefghij_", min_size=1, max_size=8))] = draw(LEAF)
    text = "".join(f"{k} = {toml_value(v)}\n" for k, v in values.items())
    if draw(st.integers(0, 6)) == 0:
        text = draw(byte_edits(text.encode())).decode("utf-8", "replace")
    return text


HPARAM_KEYS = ["l1", "target_l0", "k", "aux_k", "aux_coeff", "sparsity", "bandwidth", "threshold",
               "warmup_steps", "l1_warmup_frac", "r", "nonsense"]  # fmt: skip


@FUZZ
@given(recipe=recipes(), hparams=st.lists(st.tuples(st.sampled_from(HPARAM_KEYS), st.one_of(
    st.text(max_size=6), st.integers(-3, 100).map(str), st.floats().map(repr), st.sampled_from(["nan", "1e400",
    "null", "true", "[1]", "{}"]))), max_size=2))  # fmt: skip
def test_fuzzed_recipes_and_hparams_train_or_are_refused_in_one_line(base, recipe, hparams):
    with Case(base) as case:
        (case / "r.toml").write_text(recipe)
        args = ["train", "--config", case / "r.toml", "--store", base["store"], "--device", "cpu", "--no-compile",
                "--out", case / "run"]  # fmt: skip
        if "d_sae" not in recipe and "expansion" not in recipe:
            args += ["--d-sae", 32]
        if "tokens" not in recipe:  # small runs: the budget goes to many cases, not long ones
            args += ["--tokens", 128, "--batch-size", 64]
        for key, value in hparams:
            args += ["--hparam", f"{key}={value}"]
        code, _ = run_cli("train recipe TOML and --hparam", args, [case / "r.toml", Path(base["store"])])
        if code == 0:
            assert (case / "run" / "sae_weights.safetensors").exists()
    tally("fuzzed inputs: train recipe TOML and --hparam")


RUN_FILES = ["metrics.jsonl", "train_config.json", "checkpoints/step_00000004/state.json",
             "checkpoints/step_00000004/model.safetensors", "checkpoints/step_00000004/optimizer.safetensors",
             "checkpoints/step_00000004/rng.safetensors"]  # fmt: skip


@st.composite
def metrics_edits(draw, raw: bytes) -> bytes:
    lines = raw.decode().splitlines(keepends=True)
    kind = draw(st.sampled_from(["line", "drop", "garbage", "bytes"]))
    if kind == "bytes":
        return draw(byte_edits(raw))
    i = draw(st.integers(0, len(lines) - 1))
    if kind == "line":
        lines[i] = json.dumps(draw(json_edits(json.loads(lines[i])))) + "\n"
    elif kind == "drop":
        del lines[i]
    else:
        lines.insert(i, draw(st.text(max_size=20)) + draw(st.sampled_from(["\n", ""])))
    return "".join(lines).encode()


@FUZZ
@given(data=st.data())
def test_fuzzed_run_directory_resumes_or_is_refused_in_one_line(base, data):
    name = data.draw(st.sampled_from(RUN_FILES), label="file")
    with Case(base, "run") as case:
        run = case / "run"
        raw = (run / name).read_bytes()
        if name == "metrics.jsonl":
            new = data.draw(metrics_edits(raw), label="new bytes")
        elif name.endswith(".json"):
            new = data.draw(json_file_edit(raw), label="new bytes")
        else:
            new = data.draw(safetensors_edit(run / name), label="new bytes")
        (run / name).write_bytes(new)
        args = ["train", "--store", base["store"], "--method", "relu", "--out", run, "--resume"]
        code, _ = run_cli("train --resume run directory", args, [run, Path(base["store"])])
        if code == 0 and name == "metrics.jsonl":  # the log is not state: the run ends as if never touched
            finished = load_file(str(base["finished"]))
            for key, value in load_file(str(run / "sae_weights.safetensors")).items():
                assert torch.equal(value, finished[key]), key
        elif code == 0:
            assert (run / "sae_weights.safetensors").exists()
    tally("fuzzed inputs: metrics.jsonl and checkpoints read by --resume")


# --- each class of failure the fuzzing found, as the named error it now is --------------------------


def refusal(args: list, inputs: list[Path]) -> str:
    code, line = run_cli("named errors", args, inputs)
    assert code == 2
    return line.removeprefix("error: ")


def test_the_failures_fuzzing_found_are_named_errors(base):
    with Case(base, "store", "sae", "run") as case:
        store, sae, run = case / "s.zarr", case / "sae", case / "run"
        # store: provenance attributes the stages read, missing or of the wrong type
        meta = json.loads((store / "zarr.json").read_text())
        del meta["attributes"]["atmpipe"]["model"]["name"]
        (store / "zarr.json").write_text(json.dumps(meta))
        assert refusal(["info", store], [store]).startswith(
            f"store {store} is inconsistent: attribute model is {{'source': 'synthetic', "
        )
        # store: a split group's zarr.json that zarr cannot read
        (store / "zarr.json").write_text(json.dumps({**meta, "attributes": json.loads(
            (Path(base["store"]) / "zarr.json").read_text())["attributes"]}))  # fmt: skip
        (store / "train" / "zarr.json").write_text("")
        assert refusal(["info", store], [store]).startswith(
            f"store {store} is inconsistent: train has unreadable metadata ("
        )
        # SAE: a name of the wrong type, a tensor of integers, a NaN weight
        cfg = json.loads((sae / "cfg.json").read_text())
        (sae / "cfg.json").write_text(json.dumps({**cfg, "metadata": {**cfg["metadata"], "model_name": 1}}))
        args = ["eval", "--sae", sae, "--store", store, "--metrics", "core", "--out", case / "report"]
        assert refusal(args, [sae]) == (
            f"{sae / 'cfg.json'}: key 'model_name' has invalid value 1 (expected a string); fix it"
        )
        (sae / "cfg.json").write_text(json.dumps(cfg))
        weights = load_file(str(sae / "sae_weights.safetensors"))
        save_file({**weights, "b_dec": weights["b_dec"].int()}, str(sae / "sae_weights.safetensors"))
        assert refusal(args, [sae]) == (
            f"{sae / 'sae_weights.safetensors'}: tensor 'b_dec' has dtype int32, expected a floating-point dtype; "
            "re-save the SAE"
        )
        weights["W_enc"][0, 0] = math.nan
        save_file(weights, str(sae / "sae_weights.safetensors"))
        assert refusal(args, [sae]) == (
            f"{sae / 'sae_weights.safetensors'}: tensor 'W_enc' holds 1 NaN or infinite values; re-save the SAE"
        )
        # recipes and --hparam values of the wrong type
        (case / "r.toml").write_text('tokens = 1.5\nbuffer_chunks = "many"\n')
        train = ["train", "--store", base["store"], "--device", "cpu", "--out", case / "new"]
        assert refusal([*train, "--config", case / "r.toml"], [case / "r.toml"]) == (
            "config key tokens is 1.5, not of type int; fix its value"
        )
        (case / "r.toml").write_text("warmup_frac = 8.98846567431158e+307\n")  # overflowed the schedule
        assert refusal([*train, "--config", case / "r.toml"], [case / "r.toml"]) == (
            "warmup_frac must be in [0, 1], got 8.98846567431158e+307; fix it in the recipe"
        )
        assert refusal([*train, "--method", "relu", "--hparam", "l1_warmup_frac=[1]"], []) == (
            "hyper-parameter l1_warmup_frac is [1], not of type float; fix its value"
        )
        # --resume: a run configuration, a checkpoint state and optimiser moments it cannot continue from
        resume = ["train", "--store", base["store"], "--method", "relu", "--out", run, "--resume"]
        saved = (run / "train_config.json").read_text()
        (run / "train_config.json").write_text(json.dumps({**json.loads(saved), "identity": None}))
        assert refusal(resume, [run]) == (
            f"{run / 'train_config.json'} is not a run configuration atmpipe wrote (no method and shape in it); "
            "pass --overwrite to start the run again"
        )
        (run / "train_config.json").write_text(saved)
        checkpoint = run / "checkpoints" / "step_00000004"
        moments = load_file(str(checkpoint / "optimizer.safetensors"))
        save_file(
            {k: v for k, v in moments.items() if k != "0.exp_avg"}, str(checkpoint / "optimizer.safetensors")
        )
        assert refusal(resume, [run]).startswith(
            f"checkpoint {checkpoint} is unreadable (optimizer state of parameter 0 is {{"
        )
        save_file(moments, str(checkpoint / "optimizer.safetensors"))
        state = json.loads((checkpoint / "state.json").read_text())
        state["optimizer_groups"][0]["betas"] = [0.9]
        (checkpoint / "state.json").write_text(json.dumps(state))
        assert refusal(resume, [run]).startswith(f"checkpoint {checkpoint} is unreadable (optimizer group {{")
        # a metrics.jsonl line cut short by a kill is dropped, and the run ends as if never interrupted
        (checkpoint / "state.json").write_text(json.dumps({**state, "optimizer_groups": json.loads(
            (base["run"] / "checkpoints" / "step_00000004" / "state.json").read_text())["optimizer_groups"]}))  # fmt: skip
        with open(run / "metrics.jsonl", "a") as log:
            log.write('{"step": 5, "loss": 1.2')
        assert run_cli("named errors", resume, [run])[0] == 0
        finished = load_file(str(base["finished"]))
        for key, value in load_file(str(run / "sae_weights.safetensors")).items():
            assert torch.equal(value, finished[key]), key
        assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == list(
            range(1, 7)
        )
