"""The eval activation cache reuses only complete, checked entries: one killed mid-write (real SIGKILLs at
seeded random moments), truncated, bit-flipped or left without its metadata is computed again, and what
the next run gets is identical to an uninterrupted run's."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import torch
from reliability_helpers import tally

from atmpipe.eval.cache import ActivationCache

CONFIG = {"prompts": 64, "seed": 0}


def reference_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "acts": torch.randn(2048, 1024, generator=g),
        "ids": torch.arange(2048),
    }  # 8 MB: a write takes a while


class Counted:
    def __init__(self):
        self.calls, self.tensors = 0, reference_tensors()

    def __call__(self):
        self.calls += 1
        return self.tensors, {"words": ["a", "b"]}


def assert_reference(got) -> None:
    tensors, extra = got
    assert extra == {"words": ["a", "b"]}
    for key, value in reference_tensors().items():
        assert torch.equal(tensors[key], value), key


def test_damaged_or_incomplete_entries_are_computed_again(tmp_path: Path):
    cache, compute = ActivationCache("f" * 64, 3, root=tmp_path), Counted()
    tensors_path, meta_path = cache.paths("probe", CONFIG)
    assert_reference(cache.get_or_compute("probe", CONFIG, compute))
    assert_reference(cache.get_or_compute("probe", CONFIG, compute))
    assert compute.calls == 1  # reused
    damage = {
        "truncated": lambda: tensors_path.write_bytes(tensors_path.read_bytes()[:-1000]),
        "bit flip": lambda: tensors_path.write_bytes(
            (lambda b: b[:5000] + bytes([b[5000] ^ 1]) + b[5001:])(tensors_path.read_bytes())
        ),
        "metadata missing (killed between the two renames)": meta_path.unlink,
        "metadata cut short": lambda: meta_path.write_text(meta_path.read_text()[:20]),
        "tensors missing": tensors_path.unlink,
    }
    for n, (what, act) in enumerate(damage.items(), 2):
        act()
        assert_reference(cache.get_or_compute("probe", CONFIG, compute))
        assert compute.calls == n, what
        assert_reference(cache.get_or_compute("probe", CONFIG, compute))
        assert compute.calls == n, what  # and the rewritten entry is reused again
    tally("eval cache entries damaged, then computed again", len(damage))


def test_sigkill_while_writing_an_entry_never_leaves_one_that_is_read_back(tmp_path: Path):
    rng = np.random.default_rng(20261207)
    cache, compute = ActivationCache("e" * 64, 3, root=tmp_path), Counted()
    landed = mid_write = 0
    for trial in range(12):
        kind = f"k{trial % 3}"  # some kills land on a fresh entry, some over an existing one
        pid = os.fork()
        if pid == 0:  # the child writes the entry, as an `atmpipe eval` would
            try:
                cache.get_or_compute(kind, CONFIG, lambda: (compute.tensors, {"words": ["a", "b"]}))
            finally:
                os._exit(0)
        if trial % 2:  # at a random moment
            time.sleep(float(rng.uniform(0, 0.05)))
        else:  # once its temporary file exists: mid-write, or just after
            deadline = time.monotonic() + 10
            while not any(cache.dir.glob(f".*.tmp-{pid}")) and time.monotonic() < deadline:
                time.sleep(0.0002)
            time.sleep(float(rng.uniform(0, 0.002)))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        landed += os.WIFSIGNALED(status)
        mid_write += any(cache.dir.glob(f".*.tmp-{pid}"))  # its temporary file was being written
        before = compute.calls
        assert_reference(cache.get_or_compute(kind, CONFIG, compute))  # reused if whole, else recomputed
        assert compute.calls - before in (0, 1)
        tally("eval cache writes SIGKILLed, next run identical")
    print(f"eval cache: {landed} of 12 kills landed before the child finished, {mid_write} mid-write")
    assert landed >= 6  # (how many landed mid-write depends on the disk: counted, not asserted)
    tally("eval cache kills that landed mid-write", mid_write)
