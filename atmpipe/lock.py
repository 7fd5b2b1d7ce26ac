"""One writer at a time per store or run directory.

The lock is an flock on a hidden file beside the target (`.NAME.lock`): the kernel drops it when its
holder exits for any reason, SIGKILL included, so a killed writer never leaves the target locked.
Readers take no lock; they see committed shards and checkpoints only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from atmpipe.errors import UserError


class WriterBusy(UserError):
    """Another process is writing the same store or run directory."""


def lock_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.lock")


@contextlib.contextmanager
def exclusive_writer(target: Path, what: str, enabled: bool = True) -> Iterator[None]:
    """Hold the write lock of `target` (a local path) for the block, or refuse at once with WriterBusy.

    `what` names the target in the message ("store", "run directory"); `enabled=False` (remote targets,
    the non-main ranks of a distributed run) takes no lock.
    """
    if not enabled:
        yield
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    # No soft-lock fallback: a soft lock would outlive a killed holder.
    lock = FileLock(lock_path(target), blocking=False, fallback_to_soft=False)
    try:
        lock.acquire()
    except Timeout:
        raise WriterBusy(
            f"{what} {target} is being written by another atmpipe process; wait for it to finish or stop "
            "it, then re-run (a killed writer releases it at once)"
        ) from None
    try:
        yield
    finally:
        lock.release()
