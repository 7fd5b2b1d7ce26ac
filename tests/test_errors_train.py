"""Every user error of the train side (the docs/errors.md rows of atmpipe.train, atmpipe.stream and
atmpipe.sae; the eval side: tests/test_errors_eval.py), triggered as a user would: through the CLI, on real stores, saved SAEs and
tiny model checkpoints. Each checks the whole message, exit code 2, one line on stderr, no traceback, and
that nothing that existed before changed.

The tests are tables (case id → what the user passes, the exact message). The tables sit inside the test
functions because scripts/errors_table.py names a test for a message only when the test's own source holds
it. A few errors cannot be reached through the CLI (an earlier check always fires first); their public
function is called instead, and the test says why.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from reliability_helpers import assert_message, tree_digest
from test_reliability_inputs import LAYER, D, error_of, invoke, make_store

from atmpipe.errors import UserError
from atmpipe.sae import SAEConfig, make_sae
from atmpipe.store import StoreWriter, acts_name, plan_split, synthetic_attrs, write_arrays_store
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
    # The trainer's "precision: …" line and its "latents: … path from step 0" line (once per path) are not
    # the error's business.
    info = ("latents: ", "precision: ")
    progress = [line for line in result.stderr.strip().splitlines()[:-1] if not line.startswith(info)]
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
        "d_sae zero",
        "resume and overwrite",
        "unknown device",
        "cuda without a GPU",
        "lr zero",
        "lr huge",
        "precision unknown",
    ],
)
def test_train_refuses_an_impossible_option(store, tmp_path, monkeypatch, case):
    """Options of the run itself that cannot work."""
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
        "lr zero": (["--lr", "0"], "lr must be positive, got 0.0; pass --lr > 0"),
        "lr huge": (  # 1e38 used to end in a torch overflow traceback inside Adam
            ["--lr", "1e38"],
            "lr 1e+38 is too large for Adam (SAEs train at 1e-4 to 1e-3); pass e.g. --lr 3e-4",
        ),
        "precision unknown": (
            ["--precision", "fp16"],
            "precision must be one of auto, bf16, fp32 (got 'fp16'); pass e.g. --precision auto",
        ),
    }[case]
    if case == "cuda without a GPU":  # so the case means the same on a machine that has one
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert_train_refuses(store, tmp_path, args, expected)


@pytest.mark.parametrize(
    "case",
    [
        "unknown hyper-parameter",
        "l0 controller option out of range",
        "atm option out of range",
        "jumprelu sparsity mode",
        "jumprelu target without target_l0",
        "jumprelu bandwidth zero",
        "jumprelu warm-up fraction above 1",
        "atm threshold unknown",
        "atm targeting unknown",
        "relu l1 hyper-parameter zero",
        "relu l1 warm-up above 1",
        "relu target_l0 zero",
        "topk k not an integer",
        "topk aux_k zero",
        "topk aux_coeff negative",
        "matryoshka prefixes not ending at 1",
        "matryoshka default prefixes too narrow",
        "matryoshka without batch_topk",
    ],
)
def test_train_refuses_an_impossible_hyper_parameter(store, tmp_path, case):
    """A method hyper-parameter the method cannot train with."""
    args, expected = {
        "unknown hyper-parameter": (
            ["--method", "relu", "--hparam", "gamma=2"],
            "unknown hyper-parameter(s) gamma for method relu; "
            "known: adam_beta1, dead_tokens, l0_controller_push, l0_controller_rate, l1, l1_warmup_frac, target_l0",
        ),
        "l0 controller option out of range": (
            ["--method", "relu", "--hparam", "l0_controller_rate=0"],
            "l0_controller_rate must be positive and l0_controller_push non-negative (got 0 and 2.0); "
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
        "matryoshka prefixes not ending at 1": (
            ["--method", "matryoshka", "--hparam", "prefix_fractions=[0.5,0.9]"],
            "prefix_fractions must be a list of fractions of d_sae in (0, 1], the last 1 (got [0.5, 0.9]); "
            "pass e.g. --hparam 'prefix_fractions=[0.0625, 0.25, 1]'",
        ),
        "matryoshka default prefixes too narrow": (  # 1/256 of 128 latents rounds to none
            ["--method", "matryoshka"],
            "prefix_fractions [0.00390625, 0.015625, 0.0625, 0.25, 1.0] give prefix widths [0, 2, 8, 32, 128] "
            "of d_sae = 128; they must be at least 1 and strictly increasing: use fewer or wider prefixes",
        ),
        "matryoshka without batch_topk": (
            [
                "--method",
                "matryoshka",
                "--hparam",
                "batch_topk=false",
                "--hparam",
                "prefix_fractions=[0.25,1]",
            ],
            "matryoshka always selects by BatchTopK; drop batch_topk from its hyper-parameters",
        ),
    }[case]
    assert_train_refuses(store, tmp_path, args, expected)


def assert_train_refuses(store, tmp_path: Path, args: list[str], expected: str) -> None:
    """`atmpipe train ARGS` fails with `expected`, the store unchanged and no run directory made."""
    before = tree_digest(store.path)
    out = tmp_path / "run"
    assert one_line_error(tmp_path, "train", "--store", store.path, "--out", out, *TRAIN, *args) == expected
    assert tree_digest(store.path) == before and not out.exists()


@pytest.mark.parametrize(
    "case",
    ["relu k", "atm k", "jumprelu k", "topk l1", "topk target_l0", "jumprelu target_l0 with l0 sparsity",
     "no such flag", "flag without value"],
)  # fmt: skip
def test_train_refuses_a_setting_the_method_would_ignore(store, tmp_path, case):
    """A setting the chosen method would not read is refused, never silently dropped."""
    relu = "adam_beta1, dead_tokens, l0_controller_push, l0_controller_rate, l1, l1_warmup_frac, target_l0"
    topk = "adam_beta1, aux_coeff, aux_k, batch_topk, dead_tokens, k, threshold_beta"
    jumprelu = (
        "adam_beta1, bandwidth, dead_tokens, l0_coeff, sparsity, sparsity_warmup_frac, sparsity_warmup_steps, "
        "target_l0, threshold_init, threshold_lr_scale"
    )
    atm = (
        "adam_beta1, beta, c, combine, dead_tokens, granularity, l0_controller_push, l0_controller_rate, l1, "
        "l1_warmup_frac, mask_seed, mask_warmup_frac, mask_warmup_steps, p_max, r, recon_norm, target_l0, targeting, "
        "threshold"
    )
    args, expected = {
        "relu k": (
            ["--method", "relu", "--k", "8"],
            f"--k does not apply to method relu; its hyper-parameters are: {relu}",
        ),
        "atm k": (
            ["--method", "atm", "--k", "8"],
            f"--k does not apply to method atm; its hyper-parameters are: {atm}",
        ),
        "jumprelu k": (
            ["--method", "jumprelu", "--k", "8"],
            f"--k does not apply to method jumprelu; its hyper-parameters are: {jumprelu}",
        ),
        "topk l1": (
            ["--method", "topk", "--l1", "5"],
            f"--l1 does not apply to method topk; its hyper-parameters are: {topk}",
        ),
        "topk target_l0": (
            ["--method", "topk", "--target-l0", "8"],
            f"--target-l0 does not apply to method topk; its hyper-parameters are: {topk}",
        ),
        "jumprelu target_l0 with l0 sparsity": (
            ["--method", "jumprelu", "--target-l0", "8"],
            "jumprelu ignores target_l0 (8.0) with its default sparsity 'l0'; "
            "add --hparam sparsity=target to steer L0 toward it, or drop --target-l0",
        ),
        "no such flag": (  # neither train's nor any method's: a typo is not taken for a hyper-parameter
            ["--method", "relu", "--l1-warmup", "0.1"],
            "no such option --l1-warmup: neither a flag of `atmpipe train` (see --help) nor a hyper-parameter "
            f"of method relu ({relu})",
        ),
        "flag without value": (["--method", "relu", "--l1"], "--l1 needs a value; pass it as --l1 VALUE"),
    }[case]
    assert_train_refuses(store, tmp_path, args, expected)


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
