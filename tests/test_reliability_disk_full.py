"""A disk that fills (a real size-limited tmpfs) under every writer: training's checkpoints and its final
SAE save, the eval's activation cache and report, the browser. Each run stops with one line, keeps what it
had committed (a half-written file gives its space back) and, once space returns, the same command (or
--resume) ends with what a run that never ran out writes."""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
import test_reliability_crash as crash
import test_reliability_eval_kill as kills
import torch
from reliability_helpers import can_mount, files, leftovers, tally, tmpfs
from safetensors.torch import load_file

from atmpipe.sae.atm import STATS_FILE

zygote, train_store, train_argv, last_error, world = (
    crash.zygote,
    crash.train_store,
    crash.train_argv,
    crash.last_error,
    kills.world,
)


@pytest.mark.skipif(not can_mount(), reason="needs root to mount a size-limited tmpfs")
def test_disk_full_during_training_keeps_the_last_checkpoint_and_resumes_once_space_returns(
    train_store, zygote, tmp_path
):
    reference = tmp_path / "ref"
    assert zygote.run(train_argv(train_store, reference), tmp_path / "ref.log") == 0
    disk = tmp_path / "disk"
    with tmpfs(disk, "4m"):
        out, ballast = disk / "run", open(disk / "ballast", "wb", buffering=0)

        def fill_disk(pid):
            try:
                while True:
                    ballast.write(b"\0" * 4096)
            except OSError:
                pass

        log = tmp_path / "full.log"
        steps = lambda: len(list((out / "checkpoints").glob("step_*")))  # noqa: E731
        code, acted = zygote.run_until(train_argv(train_store, out), log, lambda: steps() >= 2, fill_disk)
        assert acted and code == 2, log.read_text()
        kept = crash.assert_checkpoint_complete(out)
        assert kept >= 1 and not list((out / "checkpoints").glob(".tmp-*"))
        assert last_error(log) == (
            f"error: the disk holding the run directory {out} is full (No space left on device); the run keeps its last checkpoint "
            f"(step_{kept:08d}): free some space, then resume with: atmpipe train --store {train_store.path} "
            f"--method atm --out {out} --resume"
        )
        assert log.read_text().count("error:") == 1 and "Traceback" not in log.read_text()
        ballast.close()
        (disk / "ballast").unlink()
        resume = ["train", "--store", train_store.path, "--method", "atm", "--out", out, "--resume"]
        log = tmp_path / "resume.log"
        assert zygote.run(resume, log) == 0, log.read_text()
        for key, value in load_file(str(reference / "sae_weights.safetensors")).items():
            assert torch.equal(value, load_file(str(out / "sae_weights.safetensors"))[key]), key
        assert not leftovers(out)
    tally("disk-full training runs resumed")


# --- the final SAE save, the eval cache, the report, the browser ----------------------------------


def pages(folder: Path, skip=()) -> int:
    """Bytes a tmpfs charges for the files under `folder` (whole 4 KiB pages each), but those in `skip`."""
    return sum(
        -(-p.stat().st_size // 4096) * 4096 for p in folder.rglob("*") if p.is_file() and p.name not in skip
    )


@contextmanager
def full_disk(disk: Path, free: int = 0):
    """Take every byte of the tmpfs at `disk` but `free`; yields the ballast file, whose removal frees it."""
    ballast = disk / "ballast"
    with open(ballast, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
        f.truncate(max(0, ballast.stat().st_size - free))
    yield ballast


def fill(ballast_dir: Path):
    """An action for run_until: fill the disk there and then."""

    def act(pid):
        with open(ballast_dir / "ballast", "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass

    return act


def one_error(log: Path) -> str:
    text = log.read_text()
    assert text.count("error:") == 1 and "Traceback" not in text, text
    return last_error(log)


@pytest.mark.skipif(not can_mount(), reason="needs root to mount a size-limited tmpfs")
def test_disk_full_at_the_final_sae_save_keeps_the_last_checkpoint_and_resumes(train_store, zygote, tmp_path):
    def argv(out):
        return ["train", "--store", train_store.path, "--method", "atm", "--d-sae", 512, "--batch-size", 64,
                "--tokens", 64 * 40, "--lr", 0.003, "--out", out, "--device", "cpu", "--no-compile"]  # fmt: skip

    reference = tmp_path / "ref"
    assert zygote.run(argv(reference), tmp_path / "ref.log") == 0, (tmp_path / "ref.log").read_text()
    saved = {"sae_weights.safetensors", "cfg.json", "atmpipe.json", STATS_FILE}
    assert pages(reference) - pages(reference, skip=saved) > 8 * 4096  # the save needs more than the margin
    disk = tmp_path / "disk"
    with tmpfs(disk, "4m"), full_disk(disk, free=pages(reference, skip=saved) + 4 * 4096) as ballast:
        out, log = disk / "run", tmp_path / "full.log"
        assert zygote.run(argv(out), log) == 2, log.read_text()
        kept = crash.assert_checkpoint_complete(out)
        assert one_error(log) == (
            f"error: the disk holding the run directory {out} is full (No space left on device); the run keeps its last "
            f"checkpoint (step_{kept:08d}): free some space, then resume with: atmpipe train --store "
            f"{train_store.path} --method atm --out {out} --resume"
        )
        assert kept == 40 and not (out / "atmpipe.json").exists() and not leftovers(out)
        assert not list(out.glob(".*.tmp-*"))  # the half-written weights gave their space back
        ballast.unlink()
        resume = ["train", "--store", train_store.path, "--method", "atm", "--out", out, "--resume"]
        assert zygote.run(resume, tmp_path / "resume.log") == 0, (tmp_path / "resume.log").read_text()
        for key, value in load_file(str(reference / "sae_weights.safetensors")).items():
            assert torch.equal(value, load_file(str(out / "sae_weights.safetensors"))[key]), key
    tally("disk-full cases: the final SAE save, resumed")


@pytest.mark.skipif(not can_mount(), reason="needs root to mount a size-limited tmpfs")
def test_disk_full_while_eval_caches_keeps_whole_entries_and_resumes(world, zygote, tmp_path):
    argv = lambda out: kills.eval_argv(world, out)  # noqa: E731
    disk = tmp_path / "disk"
    with tmpfs(disk, "24m"):
        home, out, log = disk / "home", tmp_path / "out", tmp_path / "full.log"
        env = {"ATMPIPE_HOME": str(home)}
        assert (
            zygote.run(argv(out), tmp_path / "ref.log", env=env) == 0
        )  # the reference (its report names them)
        reference = kills.without_timings(files(out))
        shutil.rmtree(out)
        shutil.rmtree(home)
        entries = lambda: len(list((home / "eval-cache").glob("*/*.json")))  # noqa: E731
        code, acted = zygote.run_until(argv(out), log, lambda: entries() >= 1, fill(disk), env=env)
        assert acted and code == 2, log.read_text()
        cache = next((home / "eval-cache").glob("*"))
        assert one_error(log) == (
            f"error: the disk holding {cache} is full (No space left on device); the cache keeps its complete entries: "
            "free some space, then re-run the same command to resume"
        )
        kept = kills.valid_entries(home)  # every entry there is whole
        assert kept and not kills.temporaries(home) and not out.exists()
        (disk / "ballast").unlink()
        assert zygote.run(argv(out), tmp_path / "resume.log", env=env) == 0
        assert kills.without_timings(files(out)) == reference
        assert {n: t for n, t in kills.valid_entries(home).items() if n in kept} == kept  # reused, not redone
    tally("disk-full cases: the eval cache, resumed")


@pytest.mark.skipif(not can_mount(), reason="needs root to mount a size-limited tmpfs")
def test_disk_full_while_eval_writes_its_report_keeps_the_cache_and_resumes(world, zygote, tmp_path):
    argv = lambda out: kills.eval_argv(world, out)  # noqa: E731
    env = {"ATMPIPE_HOME": str(tmp_path / "home")}
    disk = tmp_path / "disk"
    with tmpfs(disk, "4m"):
        out, log = disk / "report", tmp_path / "full.log"
        assert (
            zygote.run(argv(out), tmp_path / "ref.log", env=env) == 0
        )  # the reference (its report names them)
        reference = kills.without_timings(files(out))
        shutil.rmtree(out)
        shutil.rmtree(tmp_path / "home")
        with full_disk(disk) as ballast:
            assert zygote.run(argv(out), log, env=env) == 2, log.read_text()
            assert one_error(log) == (
                f"error: the disk holding {out} is full (No space left on device); the LM activations stay cached: "
                "free some space, then re-run the same command to resume"
            )
            assert not [p for p in out.rglob("*") if p.is_file()]  # no half-written report file, no temporary
            cached = kills.valid_entries(tmp_path / "home")
            ballast.unlink()
            assert zygote.run(argv(out), tmp_path / "resume.log", env=env) == 0
            assert kills.without_timings(files(out)) == reference
            assert kills.valid_entries(tmp_path / "home") == cached  # the LM work was not done again
    tally("disk-full cases: the eval report, resumed")


@pytest.mark.skipif(not can_mount(), reason="needs root to mount a size-limited tmpfs")
def test_disk_full_while_inspect_writes_the_browser_leaves_no_index_and_resumes(world, zygote, tmp_path):
    argv = lambda out: kills.inspect_argv(world, out)  # noqa: E731
    assert zygote.run(argv(tmp_path / "ref"), tmp_path / "ref.log") == 0
    reference = files(tmp_path / "ref")
    disk = tmp_path / "disk"
    with tmpfs(disk, "4m"):
        out, log = disk / "features", tmp_path / "full.log"
        chunks = lambda: len(list((out / "data").glob("s*.js"))) if out.exists() else 0  # noqa: E731
        code, acted = zygote.run_until(argv(out), log, lambda: chunks() >= 3, fill(disk))
        assert acted and code == 2, log.read_text()
        assert one_error(log) == (
            f"error: the disk holding {out} is full (No space left on device); index.html is written last, so no "
            "half-written browser opens: free some space, then re-run the same command to resume"
        )
        assert not (out / "index.html").exists() and not kills.temporaries(out)
        (disk / "ballast").unlink()
        assert zygote.run(argv(out), tmp_path / "resume.log") == 0
        assert files(out) == reference
    tally("disk-full cases: the browser, resumed")
