"""The training stage: every method end to end, bit-identical resume (in process and after SIGKILL),
atomic checkpoints, signals, NaN batches, and every bad input of `atmpipe train` (exact message, exit 2)."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import sae_helpers
import torch
import zarr
from reliability_helpers import tree_digest
from rich.console import Console
from sae_helpers import planted_store
from safetensors.torch import load_file
from typer.testing import CliRunner

import atmpipe.train as train_module
from atmpipe.cli import app
from atmpipe.errors import UserError
from atmpipe.sae import SAE, SAE_METHODS, sparse
from atmpipe.store import acts_name, write_arrays_store
from atmpipe.train import TrainConfig, latest_checkpoint, lr_factor, train

LAYER, D, D_SAE, N_ATOMS = 2, 16, 64, 32
METHOD_HPARAMS = {
    "relu": {"l1": 0.3},
    "atm": {"l1": 0.3, "warmup_steps": 20},  # masking starts at step 20, full rate from step 40
    "topk": {"k": 4},
    "jumprelu": {},
    "matryoshka": {"k": 4, "prefix_fractions": [0.125, 0.5, 1.0]},
}
REPO = Path(__file__).resolve().parents[1]


def planted_acts(n: int) -> np.ndarray:
    """~3 of the planted atoms a token, plus an offset (b_dec has work to do)."""
    return sae_helpers.planted_acts(n, D, N_ATOMS, active=3, size=2.0, offset=0.5)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return planted_store(
        tmp_path_factory.mktemp("train") / "syn.zarr", planted_acts(6144), LAYER, shard_tokens=1024
    )


def config(store, out, method="relu", steps=60, **kw) -> TrainConfig:
    base = dict(
        store=str(store.path), method=method, d_sae=D_SAE, batch_size=128, tokens=128 * steps, lr=3e-3,
        hparams=dict(METHOD_HPARAMS.get(method, {})), out=str(out), checkpoint_every=20, log_every=5,
        buffer_chunks=4, device="cpu",
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "sae_weights.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# --- end to end -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(SAE_METHODS))
def test_each_method_trains_end_to_end(store, tmp_path, method):
    run = train(config(store, tmp_path / method, method, steps=150))
    log = metrics(run)
    assert [m["step"] for m in log] == list(range(5, 151, 5))
    assert log[-1]["fvu"] < 0.5 * log[0]["fvu"]
    assert all(np.isfinite(m["loss"]) for m in log)
    # The saved SAE applies to raw activations: its FVU there matches what training reported.
    sae = SAE.load(run)
    x = torch.from_numpy(store.read_acts("train", LAYER))[~torch.from_numpy(store.split("train").bos[:])]
    with torch.no_grad():
        fvu = ((sae(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
    assert sae.method == method and fvu < 0.5
    meta = json.loads((run / "atmpipe.json").read_text())
    assert meta["store"]["path"] == str(store.path)
    assert meta["metadata"]["tokens_seen"] == 150 * 128
    assert meta["metadata"]["target_l0_controller"] is False
    assert meta["metadata"]["final_metrics"]["step"] == 150
    assert {p.suffix for p in run.rglob("*") if p.is_file()} <= {
        ".json",
        ".jsonl",
        ".safetensors",
    }  # no pickle
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000140", "step_00000150"]


def test_the_latents_path_is_logged_once_per_path(store, tmp_path):
    console = Console(file=io.StringIO(), width=200)
    train(config(store, tmp_path / "r", "relu", steps=100, hparams={"l1": 3.0}), console=console)
    lines = [line for line in console.file.getvalue().splitlines() if line.startswith("latents:")]
    # Dense while most latents fire (after the random init), sparse once below the crossover.
    assert len(lines) == 2
    why = rf"\(auto: sparse below {sparse.CROSSOVER_DENSITY:.0%}\)"
    assert re.fullmatch(rf"latents: dense path from step 0, latent density [0-9.]+% {why}", lines[0])
    assert re.fullmatch(rf"latents: sparse path from step \d+, latent density [0-9.]+% {why}", lines[1])


def test_latent_path_option_must_name_a_path(store, tmp_path):
    result = cli(*common(store, "--latent-path", "csr", "--out", str(tmp_path / "r")))
    assert (
        error_of(result)
        == "error: latent_path must be one of auto, sparse, dense (got 'csr'); pass e.g. --latent-path auto"
    )
    assert not (tmp_path / "r").exists()


def test_target_l0_controller_is_recorded(store, tmp_path):
    run = train(config(store, tmp_path / "r", "relu", steps=20, hparams={"target_l0": 3.0}))
    assert json.loads((run / "atmpipe.json").read_text())["metadata"]["target_l0_controller"] is True


def test_a_run_saved_before_the_renames_resumes_with_what_it_ran():
    """A run directory written before k, l1, target_l0 and adam_beta1 became the method's own and --latents
    became --latent-path: its saved config is read in today's keys, the values it trained with kept."""
    saved = {"method": "topk", "latents": "sparse", "k": 8, "l1": None, "target_l0": None, "adam_beta1": 0.5,
             "compile": False, "resume": False, "hparams": {"aux_k": 4}}  # fmt: skip
    expected = {"method": "topk", "latent_path": "sparse", "hparams": {"aux_k": 4, "k": 8, "adam_beta1": 0.5}}
    assert train_module._current_keys(saved) == expected


def test_seed_also_seeds_atm_masks_unless_its_recipe_sets_their_seed(store, tmp_path):
    hparams = train_module.method_hparams
    assert hparams(config(store, tmp_path, "atm", seed=5), 128)["mask_seed"] == 5
    own = config(store, tmp_path, "atm", seed=5, hparams={**METHOD_HPARAMS["atm"], "mask_seed": 7})
    assert hparams(own, 128)["mask_seed"] == 7
    old_name = config(store, tmp_path, "atm", seed=5, hparams={**METHOD_HPARAMS["atm"], "seed": 7})
    assert hparams(old_name, 128)["seed"] == 7 and "mask_seed" not in hparams(old_name, 128)  # its old name
    topk = hparams(config(store, tmp_path, "topk", seed=5), 128)
    assert not {"seed", "mask_seed"} & topk.keys()  # TopK has no own seed


def test_lr_schedule_warms_up_holds_and_decays_to_zero():
    factors = [lr_factor(s, 100, 10, 0.2) for s in range(100)]
    assert factors[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert factors[10:80] == [1.0] * 70
    assert factors[80:] == pytest.approx([(100 - s) / 20 for s in range(80, 100)])


def test_clip_scale_is_the_factor_clipping_put_on_the_gradient():
    """The λ controller weighs each batch's slopes by it (docs/methods.md), so it must be clipping's own."""
    for size in (0.05, 40.0):  # under the clip (factor 1) and over it
        p = torch.nn.Parameter(torch.zeros(7))
        p.grad = size * torch.randn(7)
        before = p.grad.clone()
        norm = torch.nn.utils.clip_grad_norm_([p], 1.0)
        torch.testing.assert_close(p.grad, before * train_module.clip_scale(norm, 1.0))
        assert (float(train_module.clip_scale(norm, 1.0)) < 1) == (size > 1)


def test_one_schedule_helper_ramps_and_caps_warmups():
    from atmpipe.schedule import ramp, warmup_length

    assert [ramp(s, 10, 20) for s in (0, 10, 15, 30, 50)] == [0.0, 0.0, 0.25, 1.0, 1.0]
    assert [ramp(s, 10, 0) for s in (9, 10)] == [0.0, 1.0]  # no length: a step at `start`
    assert warmup_length(1000, 0.1, 200) == 20 and warmup_length(1000, 0.1, 1_000_000) == 1000


# --- resume ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "latents", "target_l0"),
    [(m, "auto", None) for m in sorted(SAE_METHODS)]
    + [(m, "sparse", None) for m in ("relu", "jumprelu", "atm")]
    + [("relu", "auto", 40.0), ("atm", "sparse", 40.0)],  # the λ controller's state: λ and the slopes' EMAs
)
def test_resume_from_a_mid_run_checkpoint_is_bit_identical(store, tmp_path, method, latents, target_l0):
    kw: dict = {"latent_path": latents}
    if target_l0 is not None:
        kw["hparams"] = {**METHOD_HPARAMS[method], "target_l0": target_l0}
    reference = train(config(store, tmp_path / "ref", method, **kw))
    run = train(config(store, tmp_path / "cut", method, **kw))
    # Roll the run back to its step-40 checkpoint, as if it had died there.
    for name in ("cfg.json", "sae_weights.safetensors", "atmpipe.json"):
        (run / name).unlink(missing_ok=True)
    for stale in ("step_00000060",):
        train_module.shutil.rmtree(run / "checkpoints" / stale)
    assert latest_checkpoint(run).name == "step_00000040"
    train(config(store, run, method, resume=True, **kw))
    assert_same_weights(reference, run)
    assert [m["step"] for m in metrics(run)] == [m["step"] for m in metrics(reference)]
    # Every buffer too (λ and the controller's EMAs with target_l0), in the last checkpoint.
    last = Path("checkpoints") / "step_00000060" / "model.safetensors"
    ref_state, state = load_file(str(reference / last)), load_file(str(run / last))
    assert ref_state.keys() == state.keys()
    assert all(torch.equal(state[k], ref_state[k]) for k in state)
    if target_l0 is not None:  # λ moved after the cut
        assert len({m["l1_coeff"] for m in metrics(run)[-4:]}) > 1


def test_checkpoint_write_cut_short_leaves_the_previous_one_usable(store, tmp_path, monkeypatch):
    reference = train(config(store, tmp_path / "ref"))
    real_save = train_module.save_file
    calls = []

    def crash_in_second_checkpoint(tensors, filename):
        calls.append(filename)
        if len(calls) == 5:  # the second file of the second checkpoint
            raise OSError("simulated crash mid-write")
        real_save(tensors, filename)

    monkeypatch.setattr(train_module, "save_file", crash_in_second_checkpoint)
    with pytest.raises(OSError, match="simulated crash"):
        train(config(store, tmp_path / "run"))
    monkeypatch.setattr(train_module, "save_file", real_save)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert latest_checkpoint(tmp_path / "run").name == "step_00000020"
    assert [p.name for p in checkpoints.glob(".tmp-step_00000040-*")]  # the torn write, never renamed
    train(config(store, tmp_path / "run", resume=True))
    assert_same_weights(reference, tmp_path / "run")
    assert not list(checkpoints.glob(".tmp-*"))


def train_command(store, out, *extra) -> list[str]:
    return [
        sys.executable, "-m", "atmpipe", "train", "--store", str(store.path), "--method", "atm",
        "--d-sae", str(D_SAE), "--batch-size", "64", "--tokens", str(64 * 200), "--lr", "0.003",
        "--checkpoint-every", "1", "--out", str(out), "--device", "cpu", "--hparam", "warmup_steps=20",
        "--no-compile", *extra,  # the fused kernel has its own tests; this one is about the run
    ]  # fmt: skip


# One intra-op thread: tiny matrices run faster, and every process of a comparison must use the same count.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=ENV)


def run_until_checkpoints(cmd: list[str], run: Path, n: int, sig: int) -> subprocess.CompletedProcess:
    """Start a training process and send `sig` once it has written `n` new checkpoints."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=ENV)
    seen: set[str] = set()
    while proc.poll() is None and len(seen) < n:
        seen.update(p.name for p in (run / "checkpoints").glob("step_*"))
        time.sleep(0.005)
    if proc.poll() is None:
        proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


@pytest.mark.slow
def test_sigterm_then_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(store, tmp_path):
    reference = tmp_path / "ref"
    done = run(train_command(store, reference))
    assert done.returncode == 0, done.stderr
    out = tmp_path / "run"
    stopped = run_until_checkpoints(train_command(store, out), out, 30, signal.SIGTERM)
    assert stopped.returncode == 130, stopped.stderr
    message = stopped.stderr.strip().splitlines()[-1]
    stop = re.fullmatch(
        rf"error: stopped by SIGTERM at step (\d+)/200; checkpoint saved in {re.escape(str(out))}/checkpoints/"
        rf"step_(\d{{8}}); resume with: atmpipe train --store {re.escape(str(store.path))} --method atm "
        rf"--out {re.escape(str(out))} --resume",
        message,
    )
    assert stop and int(stop[1]) == int(stop[2]), message  # the checkpoint is of the step it stopped at
    # The command it prints resumes the run by itself: the run's settings are saved with it.
    resume = message.split("resume with: atmpipe train ")[1].split()
    assert resume == ["--store", str(store.path), "--method", "atm", "--out", str(out), "--resume"]
    for _ in range(2):  # every step writes a checkpoint here, so most SIGKILLs land in the middle of one
        cmd = [sys.executable, "-m", "atmpipe", "train", *resume]
        killed = run_until_checkpoints(cmd, out, 30, signal.SIGKILL)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
    finished = run([sys.executable, "-m", "atmpipe", "train", *resume])
    assert finished.returncode == 0, finished.stderr
    assert_same_weights(reference, out)
    assert [m["step"] for m in metrics(out)] == [m["step"] for m in metrics(reference)]
    assert not list((out / "checkpoints").glob(".tmp-*"))


# --- bad data -------------------------------------------------------------------------------------


def test_nan_in_a_batch_stops_with_the_step_and_what_to_do(tmp_path):
    acts = planted_acts(2048)
    store = write_arrays_store(
        tmp_path / "nan.zarr",
        {"train": {"acts": acts}, "eval": {"acts": acts[:256]}},
        layer=LAYER,
        chunk_tokens=256,
    )
    zarr.open_group(store.path, mode="r+")["train"][acts_name(LAYER)][700:701] = (
        np.nan
    )  # after the statistics
    with pytest.raises(UserError) as e:
        train(config(store, tmp_path / "run", steps=40, batch_size=256, tokens=256 * 40, checkpoint_every=2))
    message = str(e.value)
    step = int(message.removeprefix("loss is nan at step ").split(":")[0])
    assert step < 8  # 2048 tokens = 8 batches: the bad row comes up in the first epoch
    where = (
        f"the last checkpoint (step_{step // 2 * 2:08d}) is intact"
        if step >= 2
        else "no checkpoint was written yet"
    )
    assert message == (
        f"loss is nan at step {step}: the batch holds non-finite activations; check the store with "
        f"`atmpipe verify`; {where}, continue with --resume"
    )


# --- bad input through the CLI --------------------------------------------------------------------


def cli(*args: str):
    # Typer runs a lone command without its name; with the other stages registered it needs "train".
    prefix = ["train"] if len(app.registered_commands) > 1 else []
    return CliRunner().invoke(app, [*prefix, *args])


def error_of(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output
    return lines[0]


@pytest.fixture(scope="module")
def done_run(store, tmp_path_factory):
    return train(config(store, tmp_path_factory.mktemp("done") / "run", "relu", steps=20))


def common(store, *extra):
    return [
        "--store",
        str(store.path),
        "--d-sae",
        str(D_SAE),
        "--batch-size",
        "64",
        "--tokens",
        "640",
        *extra,
    ]


def test_missing_store(tmp_path):
    missing = tmp_path / "nope.zarr"
    assert error_of(cli("--store", str(missing))) == (
        f"error: no activation store at {missing}; run `atmpipe harvest --out {missing}` first"
    )


def test_zarr_group_that_is_not_a_store(tmp_path):
    zarr.open_group(tmp_path / "g.zarr", mode="w")
    assert error_of(cli("--store", str(tmp_path / "g.zarr"))) == (
        f"error: {tmp_path / 'g.zarr'} is a Zarr group but not an atmpipe store (no 'atmpipe' attributes)"
    )


def test_incomplete_store(store, tmp_path):
    path = tmp_path / "partial.zarr"
    train_module.shutil.copytree(store.path, path)
    group = zarr.open_group(path, mode="r+")
    attrs = dict(group.attrs["atmpipe"])
    attrs["complete"] = False
    group.attrs["atmpipe"] = attrs
    assert error_of(cli("--store", str(path), "--out", str(tmp_path / "r"))) == (
        f"error: store {path} is incomplete (its harvest has not finished); resume the harvest, "
        "or pass --allow-partial to train on its committed shards only"
    )
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("k", ["0", "-3", str(D_SAE), str(D_SAE + 1)])
def test_k_out_of_range(store, tmp_path, k):
    result = cli(*common(store, "--method", "topk", "--k", k, "--out", str(tmp_path / "r")))
    assert (
        error_of(result)
        == f"error: k must be an integer with 0 < k < d_sae = {D_SAE} (got {k}); pass e.g. --k 32"
    )


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        ("--lr", "0", "lr must be positive, got 0.0; pass --lr > 0"),
        ("--lr", "-1e-3", "lr must be positive, got -0.001; pass --lr > 0"),
        ("--batch-size", "0", "batch_size must be positive, got 0; pass --batch-size > 0"),
        ("--tokens", "-5", "tokens must be positive, got -5; pass --tokens > 0"),
    ],
)
def test_non_positive_numbers(store, tmp_path, flag, value, expected):
    assert error_of(cli(*common(store, flag, value, "--out", str(tmp_path / "r")))) == f"error: {expected}"


@pytest.mark.parametrize("value", ["0", "-0.5"])
def test_non_positive_l1(store, tmp_path, value):
    result = cli(*common(store, "--method", "relu", "--l1", value, "--out", str(tmp_path / "r")))
    expected = f"error: l1 coefficient must be positive (got {float(value)}); pass e.g. --l1 5"
    assert error_of(result) == expected


def test_unknown_method(store, tmp_path):
    from atmpipe.sae import SAE_METHODS

    result = cli(*common(store, "--method", "sparsemax", "--out", str(tmp_path / "r")))
    assert (
        error_of(result)
        == f"error: unknown method 'sparsemax'; known methods: {', '.join(sorted(SAE_METHODS))}"
    )


def test_flag_that_does_not_apply_to_the_method(store, tmp_path):
    result = cli(*common(store, "--method", "relu", "--k", "4", "--out", str(tmp_path / "r")))
    assert error_of(result).startswith("error: --k does not apply to method relu; its hyper-parameters are: ")


def test_out_dir_holding_another_run_is_refused_and_untouched(store, done_run):
    before = tree_digest(done_run)
    result = cli(*common(store, "--method", "relu", "--out", str(done_run)))
    assert error_of(result) == (
        f"error: {done_run} already holds a training run; pass --resume to continue it, --overwrite to "
        "replace it, or --out for a new run"
    )
    assert tree_digest(done_run) == before


def test_out_dir_that_is_not_a_run_is_refused(store, tmp_path):
    (tmp_path / "notes.txt").write_text("precious")
    result = cli(*common(store, "--method", "relu", "--out", str(tmp_path), "--overwrite"))
    assert (
        error_of(result)
        == f"error: {tmp_path} exists and is not an atmpipe run directory; pass another --out"
    )
    assert (tmp_path / "notes.txt").read_text() == "precious"


@pytest.mark.parametrize(
    ("extra", "asks_for"),
    [
        (("--method", "atm"), "a atm SAE (layer 2, d_in 16, d_sae 64)"),
        (("--method", "relu", "--d-sae", "32"), "a relu SAE (layer 2, d_in 16, d_sae 32)"),
    ],
)
def test_resume_from_a_run_of_another_method_or_shape(store, done_run, extra, asks_for):
    before = tree_digest(done_run)
    result = cli(*common(store, "--out", str(done_run), "--resume", *extra))
    assert error_of(result) == (
        f"error: cannot resume {done_run}: it holds a relu SAE (layer 2, d_in 16, d_sae 64), this run asks for "
        f"{asks_for}; resume with the same method and shape, or pass --out for a new run"
    )
    assert tree_digest(done_run) == before


def test_resume_against_a_store_of_another_d_model(done_run, tmp_path):
    wide = planted_acts(1024)
    other = write_arrays_store(
        tmp_path / "wide.zarr",
        {"train": {"acts": np.hstack([wide, wide])}, "eval": {"acts": np.hstack([wide, wide])[:256]}},
        layer=LAYER,
    )
    result = cli("--store", str(other.path), "--method", "relu", "--out", str(done_run), "--resume")
    assert error_of(result) == (
        f"error: cannot resume {done_run}: it holds a relu SAE (layer 2, d_in 16, d_sae 64), this run asks for "
        "a relu SAE (layer 2, d_in 32, d_sae 64); resume with the same method and shape, or pass --out for a new run"
    )


def test_overwrite_replaces_a_run(store, tmp_path):
    run = train(config(store, tmp_path / "run", "relu", steps=10))
    first = weights(run)
    result = cli(*common(store, "--method", "relu", "--out", str(run), "--overwrite", "--seed", "5"))
    assert result.exit_code == 0, result.output
    assert not torch.equal(weights(run)["W_enc"], first["W_enc"])
    assert json.loads((run / "train_config.json").read_text())["config"]["seed"] == 5


def test_recipes_load_and_name_every_method():
    from atmpipe.train import load_train_config

    for method in SAE_METHODS:  # every method has its recipe
        cfg = load_train_config(REPO / "stages" / f"train-{method}.toml")
        assert cfg.method == method and cfg.expansion * 640 == 5120
        assert os.path.basename(cfg.store).endswith(".zarr")


# --- the real embedded model ----------------------------------------------------------------------


@pytest.mark.slow
def test_end_to_end_on_a_store_harvested_from_the_embedded_model(tmp_path):
    from atmpipe.harvest import HarvestConfig, harvest

    store_path = harvest(
        HarvestConfig(tokens=4096, eval_tokens=512, batch_size=8, out=str(tmp_path / "l9.zarr"), device="cpu")
    )
    run = train(
        TrainConfig(
            store=str(store_path),
            method="topk",
            hparams={"k": 32},
            expansion=2,
            batch_size=256,
            tokens=256 * 40,
            lr=1e-3,
            out=str(tmp_path / "run"),
            log_every=5,
            device="cpu",
        )  # fmt: skip
    )
    log = metrics(run)
    assert log[-1]["fvu"] < 0.6 * log[0]["fvu"]  # 40 steps of 256 tokens: 0.74 → 0.39 when written
    cfg = json.loads((run / "cfg.json").read_text())
    assert (cfg["d_in"], cfg["d_sae"]) == (640, 1280)
    assert cfg["metadata"]["hook_name"] == "blocks.9.hook_resid_post"
    sae = SAE.load(run)
    from atmpipe.store import open_store

    store = open_store(store_path)
    keep = ~torch.from_numpy(store.split("train").bos[:])
    x = torch.from_numpy(store.read_acts("train", 9))[keep]
    with torch.no_grad():
        fvu = ((sae(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
    assert fvu == pytest.approx(log[-1]["fvu"], abs=0.15)  # raw activations, normalisation folded in


def test_allow_partial_trains_on_the_committed_shards_only(tmp_path):
    from test_stream import LAYER as STREAM_LAYER
    from test_stream import SHARD, partial_store
    from test_stream import D as STREAM_D

    store = partial_store(tmp_path / "p.zarr", committed_shards=2)
    cfg = TrainConfig(
        store=str(store.path), method="relu", layer=STREAM_LAYER, d_sae=4 * STREAM_D, batch_size=128,
        tokens=128 * 20, out=str(tmp_path / "run"), device="cpu", allow_partial=True,
    )  # fmt: skip
    meta = json.loads((train(cfg) / "atmpipe.json").read_text())
    assert meta["store"]["complete"] is False and meta["store"]["train_tokens_used"] == 2 * SHARD
    # The garbage of the uncommitted shard (1e6) never reached the SAE: the loss stayed finite and small.
    assert meta["metadata"]["final_metrics"]["fvu"] < 2
