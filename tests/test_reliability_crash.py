"""Crash anywhere, resume, lose nothing: real `atmpipe` processes killed at seeded random points.

Harvest: SIGKILL at random moments (startup, store creation, mid-shard, mid-commit); each time the store
is valid up to its last committed shard, and a re-run completes byte-identical to an uninterrupted run,
with no temp files left. SIGINT/SIGTERM stop cleanly and say how to resume, while a reader with
--allow-partial (paused harvest = any instant of an append) sees only committed shards. A disk that
fills mid-harvest (a real size-limited tmpfs) keeps the store valid, and the harvest resumes once space
returns. Train: SIGINT, then SIGKILLs between and during checkpoint writes; --resume always finds a
complete checkpoint and ends with the uninterrupted run's weights.

The processes are forked from one pre-imported parent (reliability_helpers.Zygote): real processes,
without paying the imports per kill.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from reliability_helpers import Zygote, can_mount, files, freeze, leftovers, tally, tmpfs
from safetensors.torch import load_file

from atmpipe.errors import UserError
from atmpipe.integrity import array_names, shard_key, verify_store
from atmpipe.store import acts_name, open_store, write_arrays_store
from atmpipe.stream import ShardStream
from atmpipe.train import TrainConfig, latest_checkpoint, train

SEED = 20261129
TRIALS = 10
# 60 + 4 one-batch shards of 32 tokens: long enough to kill anywhere, small enough to redo ten times.
VALUES = dict(layers=[1, 3], tokens=16 * 120, eval_tokens=16 * 8, context_size=16, batch_size=2,
              chunk_tokens=32, shard_tokens=32)  # fmt: skip
N_SHARDS = 64


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


@pytest.fixture(scope="module")
def harvested(tiny_checkpoints, tmp_path_factory, zygote):
    """(argv for an --out, the uninterrupted reference store), both from the zygote."""
    root = tmp_path_factory.mktemp("reliability-harvest")
    recipe = root / "harvest.toml"
    recipe.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in VALUES.items()))

    def argv(out: Path) -> list:
        return ["harvest", "--model", tiny_checkpoints["gemma2"], "--out", out, "--config", recipe]

    full = root / "full.zarr"
    assert zygote.run(argv(full), root / "full.log") == 0, (root / "full.log").read_text()
    return argv, full


def committed(out: Path) -> int:
    """Shards committed so far, both splits (read the way any other process would)."""
    try:
        splits = json.loads((out / "zarr.json").read_text())["attributes"]["atmpipe"]["splits"]
    except (FileNotFoundError, KeyError, ValueError):
        return 0
    return sum(m["shards_committed"] for m in splits.values())


def assert_valid_up_to_last_commit(part: Path, full: Path) -> int:
    """A store left by a crash opens, verifies clean, and its committed shards are the reference's bytes."""
    if not (part / "zarr.json").exists():
        return 0  # killed before the store existed (or while its directory was being made)
    try:
        store = open_store(part)
    except UserError as e:
        assert "was never fully created" in str(e)  # killed while creating the arrays
        return 0
    assert not verify_store(store).damaged
    n = 0
    for split, meta in store.attrs["splits"].items():
        for array in array_names(store):
            for shard in range(meta["shards_committed"]):
                key = shard_key(store, split, array, shard)
                assert (part / key).read_bytes() == (full / key).read_bytes(), key
        n += meta["shards_committed"]
    return n


def last_error(log: Path) -> str:
    return log.read_text().strip().splitlines()[-1]


# --- harvest --------------------------------------------------------------------------------------


def test_harvest_sigkill_at_random_points_then_resume_is_byte_identical(harvested, zygote, tmp_path):
    argv, full = harvested
    reference = files(full)
    rng = np.random.default_rng(SEED)
    chain = tmp_path / "chain.zarr"  # each trial's run resumes what the previous kill left
    seen = []
    for trial in range(TRIALS):
        # Kill 0-6 shards past where the last kill left it (0: during startup or store creation).
        target, delay = committed(chain) + int(rng.integers(0, 7)), float(rng.uniform(0, 0.03))
        log = tmp_path / f"kill{trial}.log"

        def kill(pid, delay=delay):
            time.sleep(delay)
            os.kill(pid, signal.SIGKILL)

        code, killed = zygote.run_until(argv(chain), log, lambda t=target: committed(chain) >= t, kill)
        assert killed and code == -signal.SIGKILL, (code, log.read_text())
        seen.append(
            (assert_valid_up_to_last_commit(chain, full), len(leftovers(chain)) if chain.exists() else 0)
        )
        # A re-run from exactly this state completes, identical to the uninterrupted run.
        trial_copy = tmp_path / f"trial{trial}.zarr"
        if chain.exists():
            shutil.copytree(chain, trial_copy)
        log = tmp_path / f"resume{trial}.log"
        assert zygote.run(argv(trial_copy), log) == 0, log.read_text()
        assert files(trial_copy) == reference
        assert not leftovers(trial_copy)
        shutil.rmtree(trial_copy)
        tally("harvest kill-and-resume trials")
    print("harvest kills (shards committed, temp files left):", seen)
    assert (
        len({n for n, _ in seen}) >= 5 and seen[-1][0] < N_SHARDS
    )  # kills really landed at different points


def test_harvest_sigint_sigterm_stop_cleanly_while_partial_training_reads_committed_shards(
    harvested, zygote, tmp_path
):
    argv, full = harvested
    out = tmp_path / "s.zarr"
    reference = open_store(full)
    for sig in (signal.SIGINT, signal.SIGTERM):
        log = tmp_path / f"{sig.name}.log"
        pid = zygote.start(argv(out), log)
        target = committed(out) + 12
        while committed(out) < target and zygote.poll(pid) is None:
            time.sleep(0.003)
        # Freeze the harvest wherever it is (maybe mid-shard): a partial reader must see committed shards only.
        freeze(pid)
        store = open_store(out)
        n_committed = store.split("train").n_committed_tokens
        assert n_committed >= 32 and not store.complete
        with ShardStream(store, 1, 32, allow_partial=True, buffer_chunks=4) as stream:
            batches = stream.rows_per_epoch // 32
            rows = np.concatenate([next(stream).numpy() for _ in range(batches)])
        assert stream.n_tokens == n_committed
        # What it read is (part of) the committed prefix of the finished store, each row at most once.
        keep = ~reference.split("train").bos[:n_committed]
        committed_rows = Counter(r.tobytes() for r in reference.read_acts("train", 1, 0, n_committed)[keep])
        assert not Counter(r.tobytes() for r in rows) - committed_rows
        if sig == signal.SIGTERM:  # and a real training run on the growing store
            run = train(TrainConfig(store=str(out), method="relu", layer=1, d_sae=64, batch_size=32, tokens=320,
                                    allow_partial=True, out=str(tmp_path / "run"), device="cpu"))  # fmt: skip
            assert json.loads((run / "atmpipe.json").read_text())["store"]["train_tokens_used"] == n_committed
        os.kill(pid, signal.SIGCONT)
        os.kill(pid, sig)
        assert zygote.wait(pid) == 130, log.read_text()
        kept = assert_valid_up_to_last_commit(out, full)
        tokens = (
            open_store(out).split("train").n_committed_tokens
            + open_store(out).split("eval").n_committed_tokens
        )
        assert kept < N_SHARDS
        assert last_error(log) == (
            f"error: stopped by {sig.name} with {tokens:,} tokens committed in {out}; they are kept: re-run the "
            "same command to resume"
        )
        assert not leftovers(out)
        tally("harvest signal stops (clean, with resume message)")
        tally("partial-store reads during a harvest (committed shards only)")
    log = tmp_path / "resume.log"
    assert zygote.run(argv(out), log) == 0, log.read_text()
    assert "resuming" in log.read_text()
    assert files(out) == files(full)
    tally("harvest kill-and-resume trials", 2)


@pytest.mark.skipif(not can_mount(), reason="needs root to mount a size-limited tmpfs")
def test_disk_full_mid_harvest_keeps_the_store_and_resumes_once_space_returns(harvested, zygote, tmp_path):
    argv, full = harvested
    disk = tmp_path / "disk"
    with tmpfs(disk, "3m"):  # the finished store takes 1.9 MB of it
        out, ballast = disk / "s.zarr", open(disk / "ballast", "wb", buffering=0)

        def fill_disk(pid):
            try:  # take every byte left
                while True:
                    ballast.write(b"\0" * 4096)
                    ballast.flush()
            except OSError:
                pass

        log = tmp_path / "full-disk.log"
        code, _ = zygote.run_until(argv(out), log, lambda: committed(out) >= 16, fill_disk)
        assert code == 2, log.read_text()
        store = open_store(out)
        tokens = sum(store.split(s).n_committed_tokens for s in ("train", "eval"))
        assert last_error(log) == (
            f"error: the disk holding {out} is full (No space left on device); the store keeps its {tokens:,} "
            "committed tokens: free some space, then re-run the same command to resume"
        )
        assert log.read_text().count("error:") == 1 and "Traceback" not in log.read_text()
        assert 16 <= assert_valid_up_to_last_commit(out, full) < N_SHARDS
        ballast.close()
        (disk / "ballast").unlink()
        log = tmp_path / "resume.log"
        assert zygote.run(argv(out), log) == 0, log.read_text()
        assert files(out) == files(full) and not leftovers(out)
    tally("disk-full harvests resumed")


# --- train ----------------------------------------------------------------------------------------

D, D_SAE, STEPS = 16, 64, 150


@pytest.fixture(scope="module")
def train_store(tmp_path_factory):
    rng = np.random.default_rng(0)
    atoms = rng.normal(size=(32, D))
    acts = ((rng.random((4096, 32)) < 0.1) * rng.exponential(2.0, (4096, 32)) @ atoms).astype(np.float32)
    path = tmp_path_factory.mktemp("reliability-train") / "syn.zarr"
    splits = {"train": {"acts": acts}, "eval": {"acts": acts[:256]}}
    return write_arrays_store(path, splits, layer=2, chunk_tokens=256, shard_tokens=1024)


def train_argv(store, out) -> list:
    return ["train", "--store", store.path, "--method", "atm", "--d-sae", D_SAE, "--batch-size", 64,
            "--tokens", 64 * STEPS, "--lr", 0.003, "--checkpoint-every", 1, "--out", out, "--device", "cpu",
            "--hparam", "warmup_steps=20", "--no-compile"]  # fmt: skip


def assert_checkpoint_complete(run: Path) -> int:
    checkpoint = latest_checkpoint(run)
    if checkpoint is None:
        return 0
    for name in ("model", "optimizer", "rng"):
        assert load_file(str(checkpoint / f"{name}.safetensors"))
    return json.loads((checkpoint / "state.json").read_text())["step"]


def test_train_sigint_then_sigkill_between_and_during_checkpoints_resumes_to_the_same_weights(
    train_store, zygote, tmp_path
):
    reference, out = tmp_path / "ref", tmp_path / "run"
    assert zygote.run(train_argv(train_store, reference), tmp_path / "ref.log") == 0

    def steps_done() -> int:
        return len(list((out / "checkpoints").glob("step_*"))) and int(
            max((out / "checkpoints").glob("step_*")).name.removeprefix("step_")
        )

    log = tmp_path / "sigint.log"
    code, _ = zygote.run_until(train_argv(train_store, out), log, lambda: steps_done() >= 10,
                               lambda pid: os.kill(pid, signal.SIGINT))  # fmt: skip
    assert code == 130, log.read_text()
    assert last_error(log).endswith(
        f"resume with: atmpipe train --store {train_store.path} --method atm --out {out} --resume"
    )
    resume = ["train", "--store", train_store.path, "--method", "atm", "--out", out, "--resume"]
    rng = np.random.default_rng(SEED)
    during = 0
    for trial in range(6):
        ahead, delay = int(rng.integers(1, 15)), float(rng.uniform(0, 0.01))
        start = steps_done()

        def kill(pid, delay=delay):
            time.sleep(delay)
            os.kill(pid, signal.SIGKILL)

        log = tmp_path / f"kill{trial}.log"
        code, killed = zygote.run_until(resume, log, lambda a=ahead, s=start: steps_done() >= s + a, kill)
        assert killed and code == -signal.SIGKILL, log.read_text()
        assert assert_checkpoint_complete(out) >= start  # the newest checkpoint is always whole
        during += bool(list((out / "checkpoints").glob(".tmp-*")))  # the kill cut a checkpoint write short
        tally("train kill-and-resume trials")
    log = tmp_path / "final.log"
    assert zygote.run(resume, log) == 0, log.read_text()
    for key, value in load_file(str(reference / "sae_weights.safetensors")).items():
        assert torch.equal(value, load_file(str(out / "sae_weights.safetensors"))[key]), key
    assert not list((out / "checkpoints").glob(".tmp-*"))
    print(f"train kills during a checkpoint write: {during} of 6")
    tally("train kills that landed inside a checkpoint write", during)
    tally("train signal stops (clean, with resume message)")


def test_train_refuses_a_damaged_chunk_or_skips_and_counts_it(train_store, tmp_path):
    from typer.testing import CliRunner

    from atmpipe.cli import app

    store_path = tmp_path / "d.zarr"
    shutil.copytree(train_store.path, store_path)
    shard = store_path / "train" / acts_name(2) / "c" / "1" / "0"
    raw = bytearray(shard.read_bytes())
    raw[10] ^= 0xFF  # inside the first chunk of shard 1 = chunk 4 (tokens 1024-1279)
    shard.write_bytes(bytes(raw))
    args = ["train", "--store", store_path, "--method", "relu", "--d-sae", 64, "--batch-size", 256,
            "--tokens", 256 * 20, "--device", "cpu", "--out", tmp_path / "run"]  # fmt: skip
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 2 and "Traceback" not in result.output
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith(f"error: chunk 4 (tokens 1024-1279) of {store_path}/train/acts_l2 is damaged (")
    result = CliRunner().invoke(app, [str(a) for a in [*args, "--skip-damaged", "--overwrite"]])
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "run" / "atmpipe.json").read_text())["metadata"]
    assert meta["skipped_damaged_chunks"] == [4]
    tally("corruptions injected", 1)
    tally("corruptions detected", 1)
