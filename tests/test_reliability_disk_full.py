"""A disk that fills during training (a real size-limited tmpfs): the run stops with one line, keeps its
last whole checkpoint (a half-written one gives its space back), and once space returns --resume ends
with the weights of a run that never ran out."""

from __future__ import annotations

import pytest
import test_reliability_crash as crash
import torch
from reliability_helpers import can_mount, leftovers, tally, tmpfs
from safetensors.torch import load_file

zygote, train_store, train_argv, last_error = (
    crash.zygote,
    crash.train_store,
    crash.train_argv,
    crash.last_error,
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
