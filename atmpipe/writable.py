"""Can a stage write its output where the user asked? Found out before the work, not after it."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from atmpipe.errors import UserError


def check_writable(path: Path) -> None:
    """Raise the OSError that making the directory `path` and writing in it would raise (no permission, a
    read-only file system, a file in the way), naming `path`; creates nothing.

    The deepest existing directory on the way is probed with a temporary file, removed at once. An existing
    `path` that is not a directory is left to the caller, which may say more about what it holds.
    """
    path = Path(path)
    base = path
    while not base.exists() and base != base.parent:
        base = base.parent
    if base == path and not path.is_dir():
        return
    if not base.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path))
    try:
        tempfile.TemporaryFile(dir=base).close()
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None


def cannot_write(out: Path, e: OSError) -> UserError:
    """The one-line error for an --out that cannot be made or written (train and eval)."""
    return UserError(f"cannot write to {out} ({e.strerror}); pass an --out in a writable directory")


def require_writable(out: Path) -> None:
    """`check_writable`, failing as `cannot_write`."""
    try:
        check_writable(out)
    except OSError as e:
        raise cannot_write(out, e) from None


def full_disk(where: Path, e: OSError, kept: str) -> UserError:
    """The one-line error for a disk that filled while a stage wrote to `where` (eval, inspect)."""
    return UserError(
        f"the disk holding {where} is full ({e.strerror}); {kept}: free some space, then re-run the same "
        "command to resume"
    )
