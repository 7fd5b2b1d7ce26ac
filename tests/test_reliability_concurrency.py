"""Two writers never share a store or a run directory; readers see committed work only.

A second `atmpipe harvest` into a store being harvested, and a second `atmpipe train` with the --out of a
running training, are refused with one line and change nothing. The lock is the kernel's (flock): a
writer killed with SIGKILL releases it, and the next run resumes to the uninterrupted result. While a
harvest is paused at an arbitrary instant, `atmpipe info` and `atmpipe verify` read the committed shards
only (no damage reported, the rest counted as not committed yet).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import test_reliability_crash as crash
from reliability_helpers import files, freeze, leftovers, tally, tree_digest
from typer.testing import CliRunner

from atmpipe.cli import app
from atmpipe.store import open_store

# The crash tests' module fixtures and helpers: the same harvest recipe, reference store and zygote.
zygote, harvested, train_store = crash.zygote, crash.harvested, crash.train_store
committed, last_error, train_argv = crash.committed, crash.last_error, crash.train_argv


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "400"})


def wait_for(pid: int, zygote, ready, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert zygote.poll(pid) is None, "the first writer ended before the second started"
        assert time.monotonic() < deadline
        time.sleep(0.003)


def test_second_harvest_is_refused_readers_see_committed_shards_and_a_killed_holder_frees_the_store(
    harvested, zygote, tmp_path
):
    argv, full = harvested
    out = tmp_path / "s.zarr"
    first = zygote.start(argv(out), tmp_path / "first.log")
    wait_for(first, zygote, lambda: committed(out) >= 6)
    freeze(first)  # anywhere: between shards, mid-shard or mid-commit
    before = tree_digest(out)
    for attempt in range(2):  # a plain re-run and an --overwrite: both refused, nothing touched
        log = tmp_path / f"second{attempt}.log"
        assert zygote.run(argv(out) + ["--overwrite"] * attempt, log) == 2, log.read_text()
        assert last_error(log) == (
            f"error: store {out} is being written by another atmpipe process; wait for it to finish or stop "
            "it, then re-run (a killed writer releases it at once)"
        )
        assert "Traceback" not in log.read_text() and tree_digest(out) == before
        tally("concurrent writers refused (one line, nothing changed)")
    store = open_store(out)
    n = {s: store.split(s).n_committed_tokens for s in ("train", "eval")}
    info = invoke("info", out)
    assert info.exit_code == 0, info.output
    for meta in store.attrs["splits"].values():
        assert f"{meta['shards_committed']}/{meta['n_shards']} shards committed" in info.stdout, info.stdout
    verify = invoke("verify", out)
    assert verify.exit_code == 0 and "damaged:" not in verify.stderr, verify.stderr
    total = {s: store.split(s).n_tokens for s in ("train", "eval")}
    pending = ", ".join(f"{total[s] - n[s]:,} {s} tokens" for s in ("train", "eval") if total[s] > n[s])
    assert f"0 damaged ({pending} not committed yet)" in verify.stderr
    tally("reads of a store being harvested (info, verify): committed shards only", 2)
    os.kill(first, signal.SIGKILL)  # the holder dies frozen: the kernel drops its lock
    assert zygote.wait(first) == -signal.SIGKILL
    log = tmp_path / "resume.log"
    assert zygote.run(argv(out), log) == 0, log.read_text()
    assert files(out) == files(full) and not leftovers(out)
    tally("writer locks released by a SIGKILLed holder, then resumed")


def test_second_train_with_the_same_out_is_refused_and_a_killed_holder_frees_it(
    train_store, zygote, tmp_path
):
    out = tmp_path / "run"
    first = zygote.start(train_argv(train_store, out), tmp_path / "first.log")
    wait_for(first, zygote, lambda: len(list((out / "checkpoints").glob("step_*"))) >= 3)
    freeze(first)
    before = tree_digest(out)
    resume = ["train", "--store", train_store.path, "--method", "atm", "--out", out, "--resume"]
    for i, argv in enumerate((resume, train_argv(train_store, out) + ["--overwrite"])):
        log = tmp_path / f"second{i}.log"
        assert zygote.run(argv, log) == 2, log.read_text()
        assert last_error(log) == (
            f"error: run directory {out} is being written by another atmpipe process; wait for it to finish "
            "or stop it, then re-run (a killed writer releases it at once)"
        )
        assert "Traceback" not in log.read_text() and tree_digest(out) == before
        tally("concurrent writers refused (one line, nothing changed)")
    os.kill(first, signal.SIGKILL)
    assert zygote.wait(first) == -signal.SIGKILL
    log = tmp_path / "resume.log"
    assert zygote.run(resume, log) == 0, log.read_text()
    assert (out / "sae_weights.safetensors").exists() and not list((out / "checkpoints").glob(".tmp-*"))
    tally("writer locks released by a SIGKILLed holder, then resumed")


@pytest.mark.parametrize("what", ["store", "run directory"])
def test_the_lock_file_sits_beside_its_target_and_is_not_part_of_it(tmp_path: Path, what):
    from atmpipe.lock import WriterBusy, exclusive_writer, lock_path

    target = tmp_path / "deep" / "x"
    with exclusive_writer(target, what):
        assert lock_path(target) == tmp_path / "deep" / ".x.lock" and lock_path(target).exists()
        with pytest.raises(WriterBusy, match=f"^{what} {target} is being written"):
            with exclusive_writer(target, what):
                pass
        with exclusive_writer(target, what, enabled=False):  # remote targets, other ranks: no lock
            pass
    with exclusive_writer(target, what):  # released on exit
        assert not target.exists()
