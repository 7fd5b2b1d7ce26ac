"""rich progress bars that also leave a trail in logs.

When stderr is not a terminal (nohup, CI, `2> log`), rich draws nothing until the end; this Progress then
prints each task's line every `log_seconds`, so a background harvest or training run can be followed.
"""

from __future__ import annotations

import time

from rich import progress


class Progress(progress.Progress):
    def __init__(self, *columns, log_seconds: float = 30.0, **kwargs):
        super().__init__(*columns, **kwargs)
        self.log_seconds = log_seconds
        self._last_log = time.monotonic()

    def update(self, task_id, **kwargs) -> None:
        super().update(task_id, **kwargs)
        self._log()

    def advance(self, task_id, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._log()

    def _log(self) -> None:
        if self.console.is_terminal or time.monotonic() - self._last_log < self.log_seconds:
            return
        self._last_log = time.monotonic()
        self.log_snapshot()

    def log_snapshot(self) -> None:
        self.console.print(self.make_tasks_table([t for t in self.tasks if t.visible]))
