"""SIGINT/SIGTERM for the long stages: a graceful stop at the next safe point, or an immediate one.

`with Interrupts() as stop:` installs the handlers (main thread only) and restores the previous ones on
exit. Each signal is recorded in `stop.names`; the loop checks `if stop:` between two units of work and
stops there. While `stop.graceful` is False, and on a second signal in any case, the handler raises
KeyboardInterrupt at once, so temp files are cleaned up on the way out.
"""

from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupts:
    def __init__(self, graceful: bool = True):
        self.graceful = graceful
        self.names: list[str] = []  # the signals received, in order ("SIGINT", "SIGTERM")
        self._previous: dict = {}

    def __bool__(self) -> bool:
        return bool(self.names)

    def _handler(self, signum, _frame) -> None:
        self.names.append(signal.Signals(signum).name)
        if not self.graceful or len(self.names) > 1:
            raise KeyboardInterrupt

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():  # signal.signal works only there
            self._previous = {s: signal.signal(s, self._handler) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous = {}
