"""docs/errors.md lists every user-facing error of the CLI: regenerate it when one is added or changed."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from errors_table import DOC, table  # noqa: E402


def errors_listed(text: str) -> list[str]:
    """The table's rows without their tests column (tests may change without the errors changing)."""
    return [line.rsplit("|", 2)[0] for line in text.splitlines() if line.startswith("| ")]


def test_errors_doc_lists_every_user_error():
    assert errors_listed(DOC.read_text()) == errors_listed(table()), (
        "docs/errors.md is out of date: run `python scripts/errors_table.py`"
    )
