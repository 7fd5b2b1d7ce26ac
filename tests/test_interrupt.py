"""atmpipe.interrupt.Interrupts with real signals sent to this process (os.kill)."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from atmpipe.interrupt import Interrupts


def send(sig: signal.Signals) -> None:
    os.kill(os.getpid(), sig)
    # the Python handler runs at the next bytecode boundary, i.e. before send() returns


def test_graceful_records_the_first_signal_and_a_second_stops_at_once():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with Interrupts() as stop:
        assert not stop
        send(signal.SIGTERM)
        assert stop and stop.names == ["SIGTERM"]  # recorded, work goes on to the next safe point
        with pytest.raises(KeyboardInterrupt):
            send(signal.SIGINT)
        assert stop.names == ["SIGTERM", "SIGINT"]
    assert {s: signal.getsignal(s) for s in before} == before  # the previous handlers are back


def test_not_graceful_stops_at_the_first_signal_until_switched():
    # Python's own handler first: a job started in the background (as CI may be) inherits SIGINT ignored.
    original = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _not_graceful_until_switched()
    finally:
        signal.signal(signal.SIGINT, original)


def _not_graceful_until_switched():
    with Interrupts(graceful=False) as stop:
        with pytest.raises(KeyboardInterrupt):
            send(signal.SIGINT)
        stop.graceful = True
        stop.names.clear()
        send(signal.SIGINT)
        assert stop.names == ["SIGINT"]
    with pytest.raises(KeyboardInterrupt):  # Python's own SIGINT handler again
        send(signal.SIGINT)


def test_outside_the_main_thread_it_installs_nothing():
    seen = {}

    def worker():
        with Interrupts() as stop:
            seen["handler"] = signal.getsignal(signal.SIGINT)
            seen["stop"] = bool(stop)

    before = signal.getsignal(signal.SIGINT)
    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == {"handler": before, "stop": False}
