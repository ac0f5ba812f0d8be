"""Connection deadlines share one watchdog thread: arming one per cycle starts no thread.

The operator arms a deadline around each of its ~100 cycles a second; these tests pin what
the shared watchdog must keep from the ``threading.Timer`` it replaced: a deadline that is
disarmed never fires, an earlier deadline armed later still fires first, and a failing
action does not stop the others. The cut itself, on a frozen server, is tested in
test_run_failures.py.
"""

from __future__ import annotations

import threading

import pytest

from pgrelief.connection import ManagedConnection, _Watchdog

WAIT_S = 10.0  # generous: the machine is shared; nothing here measures speed


def test_a_deadline_per_cycle_starts_no_thread_per_cycle(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[str] = []
    start = threading.Thread.start

    def counted(thread: threading.Thread) -> None:
        started.append(thread.name)
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", counted)
    connection = ManagedConnection("host=unused")  # a deadline needs no open connection
    for _ in range(200):
        with connection.deadline(30.0):
            pass
    assert len(started) <= 1  # the shared watchdog, if this process had not started it yet
    assert connection.expired == 0


def test_a_disarmed_deadline_never_fires_and_a_later_earlier_one_fires_first() -> None:
    watchdog = _Watchdog()
    order: list[str] = []
    done = threading.Event()
    disarmed = watchdog.schedule(0.2, lambda: order.append("disarmed"))
    watchdog.schedule(0.6, lambda: (order.append("late"), done.set()))
    watchdog.schedule(0.05, lambda: order.append("early"))  # must wake the sleeping thread
    watchdog.cancel(disarmed)
    assert done.wait(WAIT_S)
    assert order == ["early", "late"]


def test_a_failing_deadline_does_not_stop_the_others() -> None:
    watchdog = _Watchdog()
    fired = threading.Event()

    def broken() -> None:
        raise OSError("the socket was already gone")

    watchdog.schedule(0.01, broken)
    watchdog.schedule(0.05, fired.set)
    assert fired.wait(WAIT_S)
