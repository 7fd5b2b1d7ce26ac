"""Files that land whole or not at all: write to a temporary sibling, then rename over the target."""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Iterator
from pathlib import Path

_TMP = re.compile(r"^\..+\.tmp-(\d+)$")  # the temporary name below: .NAME.tmp-PID


@contextlib.contextmanager
def atomic_file(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it replaces `target` in one rename.

    A crash or an exception leaves `target` as it was (absent or old) and removes the temporary file
    (a SIGKILL leaves it behind: `sweep` removes it later). A full disk is raised as an OSError ENOSPC
    naming `target`, whichever library wrote the file.
    """
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb") as fh:  # data on disk before the rename makes it visible
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except Exception as e:
        if disk_full(e) and not isinstance(e, OSError):  # safetensors says it in its own words
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target)) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


def disk_full(e: BaseException) -> bool:
    """Did this write fail for want of space? (An OSError, or an error quoting the OS's: safetensors.)"""
    codes = (errno.ENOSPC, errno.EDQUOT)
    return getattr(e, "errno", None) in codes or any(f"(os error {c})" in str(e) for c in codes)


def sweep(folder: Path) -> None:
    """Remove the temporary files that killed processes left in `folder` (those of live ones stay)."""
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        if (m := _TMP.match(p.name)) and not _alive(int(m[1])):
            p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
