"""The one progress display of atmpipe: a rich bar on a terminal, whole readable lines in a log.

Every long phase (harvest, train, eval, verify) shows the same layout: what runs, the bar, done/total,
the rate, the time elapsed, the ETA, and a free `info` text (GB written, the last losses...). When the
console is not a terminal (nohup, CI, `make demo > log`) no live bar is drawn, since rich would cut it to
the console width ("0… ETA -…"); each task instead prints one plain line every `log_seconds`, when it
finishes, and at the end.
"""

from __future__ import annotations

import datetime
import time

from rich import progress
from rich.console import Console
from rich.text import Text


def _clock(seconds: float | None) -> str:
    return "-:--:--" if seconds is None else str(datetime.timedelta(seconds=int(seconds)))


class _RateColumn(progress.ProgressColumn):
    def render(self, task) -> Text:
        return Text(task.fields.get("rate_text", ""), style="progress.data.speed")


class Progress(progress.Progress):
    """`add_task(description, total=..., completed=..., rate=..., info=...)`; rate defaults to the speed."""

    def __init__(
        self, console: Console, *, unit: str = "", speed_unit: str = "/s", log_seconds: float = 30.0
    ):
        self.unit, self.speed_unit, self.log_seconds = unit, speed_unit, log_seconds
        columns = (
            progress.TextColumn("[bold]{task.description}"),
            progress.BarColumn(),
            progress.TextColumn("{task.completed:,.0f}/{task.total:,.0f}" + unit),
            _RateColumn(),
            progress.TimeElapsedColumn(),
            progress.TextColumn("ETA"),
            progress.TimeRemainingColumn(),
            progress.TextColumn("{task.fields[info]}"),
        )
        super().__init__(*columns, console=console, transient=False, disable=not console.is_terminal)
        self._last_log = time.monotonic()
        self._logged: dict[int, float] = {}  # task id -> `completed` when its last line was printed

    def add_task(self, description: str, total: float | None = None, **fields) -> progress.TaskID:
        fields.setdefault("rate", "")
        fields.setdefault("info", "")
        task = super().add_task(description, total=total, **fields)
        self._refresh_rate(task)
        return task

    def update(self, task_id, **kwargs) -> None:
        super().update(task_id, **kwargs)
        self._refresh_rate(task_id)
        self._log()

    def advance(self, task_id, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._refresh_rate(task_id)
        self._log()

    def stop(self) -> None:
        super().stop()
        if not self.console.is_terminal:
            self._print_lines()

    def _refresh_rate(self, task_id) -> None:
        """The rate shown: the caller's `rate` text, else the measured speed in `speed_unit`."""
        task = self._tasks[task_id]
        speed = task.speed
        measured = f"{speed:,.1f}{self.speed_unit}" if speed else ""
        task.fields["rate_text"] = task.fields["rate"] or measured

    def _log(self) -> None:
        if self.console.is_terminal:
            return
        finished = any(t.finished and self._logged.get(t.id) != t.completed for t in self.tasks)
        if finished or time.monotonic() - self._last_log >= self.log_seconds:
            self._print_lines()

    def _print_lines(self) -> None:
        self._last_log = time.monotonic()
        for task in self.tasks:
            if task.visible and self._logged.get(task.id) != task.completed:
                self._logged[task.id] = task.completed
                self.console.print(Text(self.line(task)), soft_wrap=True, highlight=False)

    def line(self, task: progress.Task) -> str:
        """One task as a plain line: every field whole, whatever the console width."""
        parts = [
            task.description,
            f"{task.completed:,.0f}/{task.total:,.0f}{self.unit}",
            task.fields["rate_text"],
            f"{_clock(task.finished_time if task.finished else task.elapsed)} elapsed",
            f"ETA {_clock(0 if task.finished else task.time_remaining)}",
            task.fields["info"],
        ]
        return "  ".join(p for p in parts if p)
