"""Shared by the reliability tests: real processes to kill (Zygote), store snapshots, mounts, and the
figures `make reliability` prints (tally)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COUNTS_ENV = "ATMPIPE_RELIABILITY_COUNTS"  # JSON file the figures are added to (scripts/reliability.sh)


def tree_digest(path: Path) -> str:
    """sha256 over a directory's relative paths and file bytes: equal digests, nothing changed."""
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def tally(figure: str, n: int = 1) -> None:
    """Add `n` to one of the figures `make reliability` prints (a no-op unless it asked for them)."""
    path = os.environ.get(COUNTS_ENV)
    if not path or not n:
        return
    counts = json.loads(Path(path).read_text()) if Path(path).exists() else {}
    counts[figure] = counts.get(figure, 0) + n
    Path(path).write_text(json.dumps(counts, indent=1, sort_keys=True) + "\n")


class Zygote:
    """Forks real `atmpipe` CLI processes from one pre-imported parent (tests/reliability_zygote.py)."""

    def __init__(self):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "reliability_zygote.py")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO, env=env,
        )  # fmt: skip

    def _ask(self, request: dict) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def start(self, argv: list[str], log: Path, cwd: Path | None = None, env: dict | None = None) -> int:
        request = {"op": "run", "argv": [str(a) for a in argv], "log": str(log), "cwd": str(cwd or REPO)}
        return self._ask({**request, "env": env or {}})["pid"]

    def poll(self, pid: int) -> int | None:
        return self._ask({"op": "wait", "pid": pid, "nohang": True})["code"]

    def wait(self, pid: int) -> int:
        return self._ask({"op": "wait", "pid": pid})["code"]

    def run(self, argv: list[str], log: Path, **kw) -> int:
        return self.wait(self.start(argv, log, **kw))

    def run_until(
        self, argv, log: Path, ready: Callable[[], bool], act: Callable[[int], None], timeout=120, env=None
    ):
        """Start a run; once `ready()` (polled) call `act(pid)` (e.g. send a signal); returns (exit code, acted)."""
        pid = self.start(argv, log, env=env)
        deadline = time.monotonic() + timeout
        while True:
            code = self.poll(pid)
            if code is not None:
                return code, False
            if ready() or time.monotonic() > deadline:
                break
            time.sleep(0.003)
        act(pid)
        return self.wait(pid), True

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def files(path: Path) -> dict[str, bytes]:
    """Every file under `path`, by relative path: two stores are byte-identical when these are equal."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def leftovers(path: Path) -> list[str]:
    """Temp files and directories that a finished run must not leave behind."""
    return sorted(str(p) for p in path.rglob("*") if p.name.endswith(".partial") or p.name.startswith(".tmp"))


def can_mount() -> bool:
    return os.geteuid() == 0 and subprocess.run(["which", "mount"], capture_output=True).returncode == 0


@contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False):
    """A real size-limited (or read-only) file system mounted at `path` (needs root)."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@contextmanager
def read_only_dir(path: Path):
    """A directory nobody may write to: a read-only tmpfs as root (root ignores file modes), else chmod."""
    if os.geteuid() == 0:
        with tmpfs(path, "1m", read_only=True):
            yield path
        return
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o555)
    try:
        yield path
    finally:
        path.chmod(0o755)


def assert_message(message: str, expected: str | re.Pattern) -> None:
    """The whole message: exactly, or a full regex match where it quotes a library's own words."""
    if isinstance(expected, re.Pattern):
        assert expected.fullmatch(message), (message, expected.pattern)
    else:
        assert message == expected


def freeze(pid: int) -> None:
    """SIGSTOP `pid` and wait until every thread of it has stopped: kill() only queues the signal, and on
    a busy machine the process may run on for a while (commit another shard) after it returns."""
    os.kill(pid, signal.SIGSTOP)
    tasks = Path(f"/proc/{pid}/task")
    while not all((t / "stat").read_text().rsplit(")", 1)[1].split()[0] in "Tt" for t in tasks.iterdir()):
        time.sleep(0.001)
