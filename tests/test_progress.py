import io

from rich.console import Console
from rich.progress import TextColumn

from atmpipe.progress import Progress


def test_progress_leaves_lines_in_a_log_when_not_a_terminal():
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=80)
    with Progress(TextColumn("{task.description} {task.completed}/{task.total}"), console=console,
                  log_seconds=0.0) as bar:  # fmt: skip
        task = bar.add_task("harvest", total=3)
        for _ in range(3):
            bar.advance(task)
    lines = [line for line in out.getvalue().splitlines() if line.strip()]
    assert [line.strip() for line in lines[:3]] == ["harvest 1/3", "harvest 2/3", "harvest 3/3"]


def test_progress_logs_nothing_extra_on_a_terminal(monkeypatch):
    console = Console(file=io.StringIO(), force_terminal=True, width=80)
    logged = []
    monkeypatch.setattr(Progress, "log_snapshot", lambda self: logged.append(self))
    with Progress(
        TextColumn("{task.description}"), console=console, log_seconds=0.0, auto_refresh=False
    ) as bar:
        task = bar.add_task("train", total=2)
        bar.advance(task)
        bar.update(task, advance=1)
    assert logged == []  # the live bar is the display; no log trail
