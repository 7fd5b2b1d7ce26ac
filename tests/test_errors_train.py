"""Every user error of the train and eval side (the docs/errors.md rows of atmpipe.train, atmpipe.stream,
atmpipe.sae and atmpipe.eval), triggered as a user would: through the CLI, on real stores, saved SAEs and
tiny model checkpoints. Each checks the whole message, exit code 2, one line on stderr, no traceback, and
that nothing that existed before changed.

The tests are tables (case id → what the user passes, the exact message). The tables sit inside the test
functions because scripts/errors_table.py names a test for a message only when the test's own source holds
it. A few errors cannot be reached through the CLI (an earlier check always fires first); their public
function is called instead, and the test says why.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard
from reliability_helpers import assert_message, tree_digest
from safetensors.torch import load_file, save_file
from test_reliability_inputs import LAYER, D, error_of, invoke, make_store

from atmpipe.errors import UserError
from atmpipe.eval.metrics import REGISTRY
from atmpipe.sae import SAEConfig, make_sae
from atmpipe.store import StoreWriter, acts_name, hook_name, plan_split, synthetic_attrs, write_arrays_store
from atmpipe.stream import ShardStream

TRAIN = ["--device", "cpu", "--batch-size", "64", "--tokens", "128"]  # two steps: every case stays fast


def one_line_error(tmp_path: Path, *args) -> str:
    """Run `atmpipe ARGS`; the one-line error it prints (exit 2, no traceback), with tmp_path unchanged."""
    before = tree_digest(tmp_path)
    result = invoke(*args)
    message = error_of(result)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert tree_digest(tmp_path) == before, "the failed command changed files that existed before"
    return message


def error_of_run(result, mid_run: bool) -> str:
    """The one-line error of `atmpipe train`; met mid-run, it follows the progress bar's last state."""
    message = error_of(result)
    # The trainer's "latents: … path from step 0" line (once per path) is not the error's business.
    progress = [line for line in result.stderr.strip().splitlines()[:-1] if not line.startswith("latents: ")]
    assert len(progress) == mid_run and all(line.startswith("train ") for line in progress), result.stderr
    return message


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A complete 2048-token, d_model 16, layer 1 store (tests/test_reliability_inputs.py::make_store)."""
    return make_store(tmp_path_factory.mktemp("errors-train") / "s.zarr")


# --- train: options and hyper-parameters ------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    [
        "d_sae zero", "resume and overwrite", "unknown device", "cuda without a GPU",
        "unknown hyper-parameter", "atm option out of range", "jumprelu sparsity mode",
        "jumprelu target without target_l0", "jumprelu bandwidth zero", "jumprelu warm-up fraction above 1",
        "atm threshold unknown", "atm targeting unknown", "relu l1 hyper-parameter zero",
        "relu l1 warm-up above 1", "relu target_l0 zero", "topk k not an integer", "topk aux_k zero",
        "topk aux_coeff negative", "lr zero", "lr huge",
    ],
)  # fmt: skip
def test_train_refuses_an_impossible_option(store, tmp_path, monkeypatch, case):
    args, expected = {
        "d_sae zero": (
            ["--d-sae", "0"],
            "d_sae must be positive, got 0; pass e.g. --d-sae 5120 or --expansion 8",
        ),
        "resume and overwrite": (
            ["--resume", "--overwrite"],
            "--resume and --overwrite contradict each other; pass one of them",
        ),
        "unknown device": (["--device", "tpu9"], "unknown device 'tpu9'; pass cpu, cuda, cuda:1 or auto"),
        "cuda without a GPU": (
            ["--device", "cuda"],
            "--device cuda was asked for but no CUDA GPU is visible; drop --device or pass --device cpu",
        ),
        "unknown hyper-parameter": (
            ["--method", "relu", "--hparam", "gamma=2"],
            "unknown hyper-parameter(s) gamma for method relu; "
            "known: dead_tokens, l0_controller_push, l0_controller_rate, l1, l1_warmup_frac, target_l0",
        ),
        "l0 controller option out of range": (
            ["--method", "relu", "--hparam", "l0_controller_rate=0"],
            "l0_controller_rate must be positive and l0_controller_push non-negative (got 0.0 and 2.0); "
            "pass e.g. --hparam l0_controller_rate=0.08",
        ),
        "atm option out of range": (
            ["--method", "atm", "--hparam", "beta=1.5"],
            "atm beta must be in [0, 1) (got 1.5); fix the ATM options",
        ),
        "jumprelu sparsity mode": (
            ["--method", "jumprelu", "--hparam", "sparsity=l2"],
            "jumprelu sparsity must be 'l0' or 'target' (got 'l2')",
        ),
        "jumprelu target without target_l0": (
            ["--method", "jumprelu", "--hparam", "sparsity=target"],
            "jumprelu sparsity 'target' needs a positive target_l0; pass --target-l0 64",
        ),
        "jumprelu bandwidth zero": (
            ["--method", "jumprelu", "--hparam", "bandwidth=0"],
            "jumprelu bandwidth must be positive (got 0)",
        ),
        "jumprelu warm-up fraction above 1": (
            ["--method", "jumprelu", "--hparam", "sparsity_warmup_frac=2"],
            "jumprelu sparsity_warmup_frac must be in [0, 1] (got 2)",
        ),
        "atm threshold unknown": (
            ["--method", "atm", "--hparam", "threshold=sqrt"],
            "atm threshold must be 'linear' or 'log' (got 'sqrt'); fix the ATM options",
        ),
        "atm targeting unknown": (
            ["--method", "atm", "--hparam", "targeting=random"],
            "atm targeting must be 'adaptive' or 'uniform' (got 'random'); fix the ATM options",
        ),
        "relu l1 hyper-parameter zero": (  # --hparam skips the --l1 flag's own check: the SAE's catches it
            ["--method", "relu", "--hparam", "l1=0"],
            "l1 coefficient must be positive (got 0); pass e.g. --l1 5",
        ),
        "relu l1 warm-up above 1": (
            ["--method", "relu", "--hparam", "l1_warmup_frac=2"],
            "l1_warmup_frac must be in [0, 1] (got 2)",
        ),
        "relu target_l0 zero": (
            ["--method", "relu", "--target-l0", "0"],
            "target_l0 must be positive (got 0.0); pass e.g. --target-l0 64",
        ),
        "topk k not an integer": (
            ["--method", "topk", "--hparam", "k=2.5"],
            "k must be an integer with 0 < k < d_sae = 128 (got 2.5); pass e.g. --k 32",
        ),
        "topk aux_k zero": (["--method", "topk", "--hparam", "aux_k=0"], "aux_k must be positive (got 0)"),
        "topk aux_coeff negative": (
            ["--method", "topk", "--hparam", "aux_coeff=-0.5"],
            "aux_coeff must be non-negative (got -0.5)",
        ),
        "lr zero": (["--lr", "0"], "lr must be positive, got 0.0; pass --lr > 0"),
        "lr huge": (  # 1e38 used to end in a torch overflow traceback inside Adam
            ["--lr", "1e38"],
            "lr 1e+38 is too large for Adam (SAEs train at 1e-4 to 1e-3); pass e.g. --lr 3e-4",
        ),
    }[case]
    if case == "cuda without a GPU":  # so the case means the same on a machine that has one
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    before = tree_digest(store.path)
    out = tmp_path / "run"
    assert one_line_error(tmp_path, "train", "--store", store.path, "--out", out, *TRAIN, *args) == expected
    assert tree_digest(store.path) == before and not out.exists()


def test_train_refuses_an_out_it_cannot_make(store, tmp_path):
    (tmp_path / "notes.txt").write_text("a file the user already has\n")
    out = tmp_path / "notes.txt" / "run"  # --out under a file: the run directory cannot be made
    message = one_line_error(tmp_path, "train", "--store", store.path, "--out", out, *TRAIN)
    assert message == f"cannot write to {out} (Not a directory); pass an --out in a writable directory"


# --- train: resuming a run ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(store, tmp_path_factory):
    """A real 4-step relu run (checkpoints at steps 2 and 4), for the resume cases to copy and break."""
    out = tmp_path_factory.mktemp("errors-train-run") / "run"
    args = ["--method", "relu", "--d-sae", "32", "--tokens", "256", "--checkpoint-every", "2"]
    result = invoke(
        "train", "--store", store.path, "--out", out, "--device", "cpu", "--batch-size", 64, *args
    )
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize(
    "case", ["seed changed", "store with fewer tokens", "run config not JSON", "checkpoint state not JSON"]
)
def test_train_refuses_to_resume_a_run_it_cannot_continue(store, finished_run, tmp_path, case):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    checkpoint = run / "checkpoints" / "step_00000004"
    smaller = tmp_path / "small.zarr"
    more = ["--tokens", "512"]  # a longer run than the one saved: resuming continues it
    args, expected = {
        "seed changed": (
            ["--seed", "1", *more],
            "the saved stream position was made with {'seed': 0, 'chunk_tokens': 128, 'buffer_chunks': 32}, "
            "this stream has {'seed': 1, 'chunk_tokens': 128, 'buffer_chunks': 32}; "
            "resume with the same seed and store",
        ),
        "store with fewer tokens": (
            ["--store", smaller, *more],
            f"the saved stream read 2048 tokens of {smaller}, which now has only 1024 committed; "
            "resume against the store the run was started with",
        ),
        "run config not JSON": (
            [],
            f"{run}/train_config.json is not valid JSON (Expecting value: line 1 column 1 (char 0)); "
            "pass --overwrite to start the run again",
        ),
        "checkpoint state not JSON": (
            [],
            f"checkpoint {checkpoint} is unreadable (Expecting value: line 1 column 1 (char 0)); "
            "delete it to resume from the one before",
        ),
    }[case]
    if case == "store with fewer tokens":
        make_store(smaller, n_train=1024)
    elif case == "run config not JSON":
        (run / "train_config.json").write_text("not json\n")
    elif case == "checkpoint state not JSON":
        (checkpoint / "state.json").write_text("")  # e.g. a disk that filled up under another tool
    message = one_line_error(tmp_path, "train", "--store", store.path, "--out", run, "--resume", *args)
    assert message == expected


# --- train: stores it cannot train on ----------------------------------------------------------------


def damaged_chunk_store(path: Path) -> Path:
    """A store with one byte flipped inside train activation chunk 4 (tokens 512-639)."""
    make_store(path)
    shard = path / "train" / acts_name(LAYER) / "c" / "1" / "0"
    raw = bytearray(shard.read_bytes())
    raw[10] ^= 0xFF
    shard.write_bytes(bytes(raw))
    return path


def infinite_row_store(path: Path) -> Path:
    """A store one of whose activation rows overflowed to inf: its mean norm is inf, its scale 0."""
    acts = np.random.default_rng(0).normal(size=(1024, D)).astype(np.float32)
    acts[100] = np.inf
    write_arrays_store(path, {"train": {"acts": acts}, "eval": {"acts": acts[:256]}}, layer=LAYER)
    return path


def nothing_committed_store(path: Path) -> Path:
    """A harvest stopped before its first shard: created, nothing committed."""
    plans = {"train": plan_split(2048, 128, 512), "eval": plan_split(512, 128, 512)}
    attrs = synthetic_attrs([LAYER], D, plans, context_size=64)
    StoreWriter(path, attrs).close()
    return path


@pytest.mark.parametrize("case", ["damaged chunk", "infinite activations", "nothing committed yet"])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the inf row's statistics
def test_train_refuses_a_store_it_cannot_train_on(tmp_path, case):
    path = tmp_path / "s.zarr"
    build, args, expected = {
        "damaged chunk": (
            damaged_chunk_store,
            [],
            re.compile(
                re.escape(f"chunk 4 (tokens 512-639) of {path}/train/acts_l1 is damaged (")
                + r".+"  # the codec's own words for the failed checksum
                + re.escape("); re-harvest the store, or pass --skip-damaged to train without it")
            ),
        ),
        "infinite activations": (
            infinite_row_store,
            [],
            "norm_scale must be positive (got 0.0); check the store statistics",
        ),
        "nothing committed yet": (
            nothing_committed_store,
            ["--allow-partial"],
            f"store {path} has no committed training tokens yet; wait for its first shard",
        ),
    }[case]
    build(path)
    before = tree_digest(path)
    result = invoke("train", "--store", path, "--out", tmp_path / "run", *TRAIN, *args)
    # The damaged chunk is met mid-run, after the run directory is made (the run is resumable once the
    # store is fixed); the other stores are refused before anything is written.
    mid_run = case == "damaged chunk"
    assert_message(error_of_run(result, mid_run), expected)
    assert tree_digest(path) == before
    assert (tmp_path / "run").exists() == mid_run


def test_train_stops_when_the_loss_diverges(store, tmp_path):
    # The non-finite-batch cause of this stop is checked in tests/test_train.py; this is the other cause.
    before = tree_digest(store.path)
    args = ["--method", "relu", "--l1", "1e38", "--tokens", "256"]  # the sparsity term overflows float32
    result = invoke("train", "--store", store.path, "--out", tmp_path / "run", *TRAIN, *args)
    expected = re.compile(
        r"loss is (nan|inf) at step \d: the training diverged; lower --lr \(or the sparsity coefficient\); "
        r"no checkpoint was written yet, continue with --resume"
    )
    assert_message(error_of_run(result, mid_run=True), expected)
    assert tree_digest(store.path) == before


def test_stream_refuses_a_non_positive_batch_size(store):
    # Not reachable through the CLI: `atmpipe train` refuses --batch-size 0 itself ("batch_size must be
    # positive"), before any stream exists. Other callers of the stream (benchmarks) meet this one.
    with pytest.raises(UserError) as e:
        ShardStream(store, LAYER, 0)
    assert str(e.value) == "batch size must be positive, got 0; pass e.g. --batch-size 4096"


def test_sae_refuses_an_empty_shape():
    # Not reachable through the CLI: `atmpipe train` refuses --d-sae 0 and a loaded cfg.json must hold
    # positive d_in/d_sae before an SAE is built. Library callers building an SAEConfig meet this one.
    with pytest.raises(UserError) as e:
        make_sae(SAEConfig("relu", D, 0))
    assert str(e.value) == "d_in and d_sae must be positive (got 16, 0); fix the SAE shape"


# --- eval: SAE directories it cannot load ------------------------------------------------------------


def saved_sae(path: Path, *, d_in: int = D, layer: int = LAYER, model: str = "synthetic", method: str = "relu",
              store: Path | None = None) -> Path:  # fmt: skip
    """An SAE saved by the SAE class's own save(), as `atmpipe train` writes it."""
    torch.manual_seed(0)
    cfg = SAEConfig(method, d_in, 4 * d_in, {}, model_name=model, layer=layer, hook_name=hook_name(layer),
                    store={"path": str(store)} if store else {})  # fmt: skip
    return make_sae(cfg).save(path)


def edit_json(file: Path, **changes) -> None:
    data = json.loads(file.read_text())
    for key, value in changes.items():
        if value is None:
            del data[key]
        else:
            data[key] = value
    file.write_text(json.dumps(data))


def as_saelens(path: Path, **cfg_changes) -> Path:
    """The SAE as SAELens alone would save it (cfg.json + weights, no atmpipe.json)."""
    (path / "atmpipe.json").unlink()
    edit_json(path / "cfg.json", **cfg_changes)
    return path


def edit_tensors(file: Path, **changes: torch.Tensor | None) -> None:
    """Replace tensors of a safetensors file (None: drop it)."""
    tensors = {**load_file(file), **changes}
    save_file({k: v for k, v in tensors.items() if v is not None}, str(file))


@pytest.mark.parametrize(
    "case",
    [
        "saelens topk without k", "cfg.json not an object", "cfg.json not JSON", "d_in missing",
        "d_sae negative", "weights not safetensors", "atm statistics of another width",
        "layer not a number", "weights of another shape", "cfg.json missing", "weights missing",
        "atm statistics missing a tensor", "activations normalised", "weights missing a tensor",
    ],
)  # fmt: skip
def test_eval_refuses_an_sae_directory_it_cannot_load(tmp_path, monkeypatch, case):
    monkeypatch.setenv("ATMPIPE_HOME", str(tmp_path / "home"))
    sae = saved_sae(tmp_path / "sae", method="atm" if case.startswith("atm statistics") else "relu")
    cfg, weights = sae / "cfg.json", sae / "sae_weights.safetensors"
    break_it, expected = {
        "saelens topk without k": (
            lambda: as_saelens(sae, architecture="topk"),
            f"{cfg}: key 'k' is missing (a topk SAE needs it); add it to cfg.json",
        ),
        "cfg.json not an object": (
            lambda: cfg.write_text("[16, 64]"),
            f"{cfg} must hold a JSON object, found list; re-save the SAE",
        ),
        "cfg.json not JSON": (
            lambda: cfg.write_text('{"d_in": 16,'),
            f"{cfg} is not valid JSON (Expecting property name enclosed in double quotes: line 1 column 13 "
            "(char 12)); re-save the SAE",
        ),
        "d_in missing": (lambda: edit_json(cfg, d_in=None), f"{cfg}: key 'd_in' is missing; re-save the SAE"),
        "d_sae negative": (
            lambda: edit_json(cfg, d_sae=-64),
            f"{cfg}: key 'd_sae' has invalid value -64 (expected a positive int); fix it",
        ),
        "weights not safetensors": (
            lambda: weights.write_bytes(b"<html>404 Not Found</html>"),
            re.compile(
                re.escape(f"{weights} is not a readable safetensors file (")
                + r".+"  # the safetensors library's own words
                + re.escape("); re-save the SAE")
            ),
        ),
        "atm statistics of another width": (
            lambda: edit_tensors(sae / "atm_stats.safetensors", M=torch.zeros(3)),
            f"{sae}/atm_stats.safetensors: tensor 'M' has shape [3], expected [64]; re-save",
        ),
        "layer not a number": (
            lambda: edit_json(sae / "atmpipe.json", layer="../1"),
            f"{sae}/atmpipe.json: key 'layer' has invalid value '../1' (expected a layer number); fix it",
        ),
        "weights of another shape": (
            lambda: edit_tensors(weights, W_enc=torch.zeros(64, D)),
            f"{weights}: tensor 'W_enc' has shape [64, 16], expected [16, 64] from cfg.json "
            "(d_in=16, d_sae=64); re-save the SAE",
        ),
        "cfg.json missing": (
            lambda: cfg.unlink(),
            f"{cfg} does not exist; pass a directory written by `atmpipe train` or SAELens",
        ),
        "weights missing": (
            lambda: weights.unlink(),
            f"{weights} does not exist; the SAE directory is incomplete, re-save it",
        ),
        "atm statistics missing a tensor": (
            lambda: edit_tensors(sae / "atm_stats.safetensors", theta=None),
            f"{sae}/atm_stats.safetensors: missing tensor 'theta'; re-save the SAE",
        ),
        "activations normalised": (  # SAELens can save SAEs that scale their input at run time
            lambda: edit_json(cfg, normalize_activations="expected_average_only_in"),
            f"{cfg}: normalize_activations='expected_average_only_in' is not supported; "
            "fold the activation scaling into the weights and set it to 'none'",
        ),
        "weights missing a tensor": (
            lambda: edit_tensors(weights, W_dec=None),
            f"{weights}: missing tensor 'W_dec' (a standard SAE needs W_enc, b_enc, W_dec, b_dec); "
            "re-save the SAE",
        ),
    }[case]
    break_it()
    message = one_line_error(tmp_path, "eval", "--sae", sae, "--out", tmp_path / "report", "--device", "cpu")
    assert_message(message, expected)
    assert not (tmp_path / "report").exists()


# --- eval: options, and SAEs that do not fit each other or the store ---------------------------------


@pytest.mark.parametrize(
    "case",
    [
        "unknown metric", "bias occupations", "unknown TPP set", "SAEs of different layers", "--layer of another layer",
        "store without the SAE's layer", "store of another width", "store of another model",
        "core without a store", "SAE without a layer", "SAE without a model", "labelled data not installed",
        "SAE directory missing", "labelled data of another layout",
    ],
)  # fmt: skip
def test_eval_refuses_options_and_saes_that_do_not_fit(store, tmp_path, monkeypatch, case):
    monkeypatch.setenv("ATMPIPE_HOME", str(tmp_path / "home"))
    a = ["--sae", tmp_path / "a"]  # a relu SAE of the store's layer and width (saved below)

    def labelled_data() -> Path:
        (tmp_path / "data").mkdir()
        csv = b"text,label\nA wonderful film.,1\nDull and long.,0\n"
        (tmp_path / "data" / "92_glue_sst2.csv.zst").write_bytes(zstandard.ZstdCompressor().compress(csv))
        return tmp_path / "data"

    other_model = tmp_path / "g2.zarr"
    args, expected = {  # args: a function, so each case builds only its own inputs
        "unknown metric": (
            lambda: [*a, "--metrics", "core,speed"],
            "unknown metric speed; known metrics: " + ", ".join(REGISTRY),  # core, absorption, … in order
        ),
        "bias occupations": (
            lambda: [*a, "--metrics", "bias", "--bias-occupations", "doctor"],
            "--bias-occupations needs 'all' or two of journalist, athlete, actor, politician, singer, researcher, "
            "got 'doctor'",
        ),
        "unknown TPP set": (
            lambda: [*a, "--metrics", "tpp", "--tpp-sets", "news_class,ag_news"],
            "unknown TPP set ag_news; known: news_class, tweet_emotion, science_category, athlete_sport, art_type",
        ),
        "SAEs of different layers": (
            lambda: [*a, "--sae", saved_sae(tmp_path / "b", layer=5), "--metrics", "probing"],
            "the SAEs were trained on different layers (a: 1, b: 5); "
            "evaluate SAEs of one model and layer together",
        ),
        "--layer of another layer": (
            lambda: [*a, "--layer", "3", "--metrics", "probing"],
            "SAE a was trained on layer 1, but --layer 3 was given; evaluate it on its own layer or drop --layer",
        ),
        "store without the SAE's layer": (
            lambda: [
                "--sae",
                saved_sae(tmp_path / "l5", layer=5),
                "--store",
                store.path,
                "--metrics",
                "core",
            ],
            f"store {store.path} holds layers [1], not layer 5 of the SAEs; "
            "pass the store the SAEs were trained on (--store)",
        ),
        "store of another width": (
            lambda: [
                "--sae",
                saved_sae(tmp_path / "wide", d_in=32),
                "--store",
                store.path,
                "--metrics",
                "core",
            ],
            f"SAE wide has width d_in=32 but store {store.path} has d_model=16; "
            "pass the store the SAE was trained on (--store)",
        ),
        "store of another model": (
            lambda: [
                "--sae",
                saved_sae(tmp_path / "g3", model="gemma-3-270m"),
                "--store",
                other_model,
                "--metrics",
                "core",
            ],
            f"SAE g3 was trained on model gemma-3-270m but store {other_model} holds gemma-2-2b; "
            "pass the matching --store",
        ),  # fmt: skip
        "core without a store": (
            lambda: [*a, "--metrics", "core"],
            "metric 'core' needs the activation store the SAEs were trained on; pass --store PATH",
        ),
        "SAE without a layer": (
            lambda: [
                "--sae",
                as_saelens(saved_sae(tmp_path / "hf"), metadata={"hook_name": "model.layers.resid"}),
                "--metrics",
                "absorption",
            ],
            "the SAEs do not record their layer; pass --layer",
        ),  # fmt: skip
        "SAE without a model": (
            lambda: [
                "--sae",
                as_saelens(saved_sae(tmp_path / "hf"), metadata={"hook_name": hook_name(LAYER)}),
                "--metrics",
                "absorption",
            ],
            "the SAEs do not record their model; pass --model",
        ),  # fmt: skip
        "labelled data not installed": (
            lambda: [*a, "--metrics", "probing"],
            "the labelled datasets (sae-probes==0.4.2) are not installed; run `make setup`",
        ),
        "SAE directory missing": (
            lambda: ["--sae", tmp_path / "a-typo", "--metrics", "probing"],
            f"SAE directory {tmp_path / 'a-typo'} does not exist; pass a directory written by `atmpipe train`",
        ),
        "labelled data of another layout": (  # a --probing-data file with other columns than sae-probes'
            lambda: [
                *a,
                "--metrics",
                "probing",
                "--probing-tasks",
                "sst2",
                "--probing-data",
                labelled_data(),
            ],
            f"labelled dataset {tmp_path / 'data' / '92_glue_sst2.csv.zst'} lacks column(s) prompt, target; "
            "expected prompt, target",
        ),
    }[case]
    saved_sae(tmp_path / "a")
    if case == "store of another model":
        shutil.copytree(store.path, other_model)
        group = json.loads((other_model / "zarr.json").read_text())
        group["attributes"]["atmpipe"]["model"]["name"] = "gemma-2-2b"
        (other_model / "zarr.json").write_text(json.dumps(group))
    if case == "labelled data not installed":  # they are installed here: hide the package, nothing more
        find_spec = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: None if name == "sae_probes" else find_spec(name, *rest))  # fmt: skip
    message = one_line_error(tmp_path, "eval", *args(), "--out", tmp_path / "report", "--device", "cpu")
    assert message == expected
    assert not (tmp_path / "report").exists()


def test_eval_needs_an_sae():
    # Not reachable through the CLI: `atmpipe eval` declares --sae required, so click refuses a command
    # without it. Library callers of load_saes / run_eval meet this one.
    from atmpipe.eval.run import load_saes

    with pytest.raises(UserError) as e:
        load_saes([])
    assert str(e.value) == "no SAE given; pass --sae DIR (one or more times)"


# --- eval: a model the SAEs or the store do not fit --------------------------------------------------


def model_store(
    path: Path, *, eval_tokens: int = 512, config_hash: str = "synthetic", model: str = "synthetic"
):
    """A 32-wide layer-1 store (the tiny models' width); the model attributes name what harvested it."""
    acts = np.random.default_rng(0).normal(size=(512, 32)).astype(np.float32)
    attrs = {"model": {"name": model, "source": model, "config_hash": config_hash, "n_layers": 4}}
    return write_arrays_store(path, {"train": {"acts": acts}, "eval": {"acts": acts[:eval_tokens]}},
                              layer=LAYER, chunk_tokens=64, attrs_extra=attrs).path  # fmt: skip


@pytest.mark.parametrize(
    "case",
    ["store too short for a window", "store of another model", "layer past the model", "SAE too narrow"],
)
def test_eval_refuses_a_model_the_saes_or_store_do_not_fit(tiny_checkpoints, tmp_path, monkeypatch, case):
    monkeypatch.setenv("ATMPIPE_HOME", str(tmp_path / "home"))
    model = str(tiny_checkpoints["gemma3"])  # 4 layers, d_model 32
    s = tmp_path / "s.zarr"
    args, expected = {
        "store too short for a window": (  # 100 eval tokens, windows of 128
            lambda: [
                "--sae",
                saved_sae(tmp_path / "a", d_in=32, model=model),
                "--store",
                model_store(s, eval_tokens=100),
                "--metrics",
                "core",
            ],
            "store eval split holds fewer than 128 tokens: no window for the downstream loss; "
            "harvest more eval documents or drop 'core'",
        ),  # fmt: skip
        "store of another model": (  # same name, other weights: the config hash differs
            lambda: [
                "--sae",
                saved_sae(tmp_path / "a", d_in=32, model=model),
                "--store",
                model_store(s, config_hash="0123456789abcdef", model=model),
                "--metrics",
                "core",
            ],
            f"model {model} ({model}) is not the model store {s} was harvested with (config hash differs); "
            "pass the store's --model",
        ),  # fmt: skip
        "layer past the model": (
            lambda: [
                "--sae",
                saved_sae(tmp_path / "a", d_in=32, layer=7, model=model),
                "--metrics",
                "absorption",
            ],
            f"layer 7 is out of range for {model} (4 layers); pass --layer",
        ),
        "SAE too narrow": (
            lambda: ["--sae", saved_sae(tmp_path / "a", d_in=16, model=model), "--metrics", "absorption"],
            f"SAE a has width d_in=16 but model {model} has d_model=32; "
            "evaluate it with the model it was trained on",
        ),
    }[case]
    message = one_line_error(tmp_path, "eval", *args(), "--out", tmp_path / "report", "--device", "cpu")
    assert message == expected
    assert not (tmp_path / "report").exists()
