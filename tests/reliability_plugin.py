"""pytest plugin for `make reliability` (scripts/reliability.sh): after the run, adds to the figures how
many rows of docs/errors.md (user-facing errors) were checked by a test that passed in this run."""

from __future__ import annotations

import sys
from pathlib import Path

from reliability_helpers import REPO, tally

sys.path.insert(0, str(REPO / "scripts"))
from errors_table import DOC, documented_tests  # noqa: E402

_passed: set[str] = set()


def pytest_runtest_logreport(report) -> None:
    if report.when == "call" and report.passed:
        file, _, name = report.nodeid.partition("::")
        _passed.add(f"{Path(file).name}::{name.split('[')[0]}")


def pytest_sessionfinish(session, exitstatus) -> None:
    rows = documented_tests(DOC.read_text())
    tally("user-facing errors listed in docs/errors.md", len(rows))
    tally(
        "user-facing errors checked by a passing test",
        sum(any(t in _passed for t in ts) for ts in rows.values()),
    )
