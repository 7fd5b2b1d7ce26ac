"""The `atmpipe` command line: parses flags, then calls one stage function. Nothing imports this module."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from atmpipe.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, pretty_exceptions_enable=False)
err = Console(stderr=True)


def _fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def run_stage(fn, *args, **kwargs):
    """Run a stage function; user errors become a one-line message and exit code 2 (no traceback)."""
    try:
        return fn(*args, **kwargs)
    except UserError as e:
        _fail(str(e), e.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", 130)


# --- harvest ------------------------------------------------------------------------------------
# (section owned by the harvest stage)


# --- info ---------------------------------------------------------------------------------------
# (section owned by the harvest stage)


# --- train --------------------------------------------------------------------------------------
# (section owned by the train stage)


# --- eval ---------------------------------------------------------------------------------------
# (section owned by the eval stage)


def main() -> None:  # pragma: no cover - `python -m atmpipe`
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
