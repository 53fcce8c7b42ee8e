"""The shared worker mechanism (otad.daemon.Worker, Daemon.spawn) that every daemon's threads run in.

These run the real module in-process: a worker thread that dies for a reason
other than an exception (SystemExit raised inside it) cannot be provoked in a
daemon from outside. The daemons' own behaviour under a raising worker is
covered through the real gateway in
tests/test_telemetry_integrity.py::test_the_forwarder_survives_a_locked_buffer_and_says_so.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest

from harness import wait_until
from otad.daemon import Daemon, Worker


def test_a_worker_that_raises_is_logged_and_runs_again(caplog):
    done = threading.Event()
    calls = []

    def work() -> None:
        calls.append(1)
        if len(calls) <= 2:
            raise ValueError(f"boom {len(calls)}")
        done.set()

    caplog.set_level(logging.ERROR, logger="otad")
    worker = Worker("probe", work, stopping=done.is_set)
    worker.start()
    worker.join(30)
    assert not worker.is_alive() and len(calls) == 3
    lines = [r.getMessage() for r in caplog.records if r.name == "otad"]
    assert len(lines) == 2, lines
    assert lines[0].startswith("probe failed: ValueError: boom 1 (at test_daemon_workers.py:")
    assert lines[0].endswith("starting it again in 1s (failure 1)")
    assert lines[1].endswith("starting it again in 2s (failure 2)")  # backing off
    assert "probe failed 2x" in worker.problem() and "ValueError: boom 2" in worker.problem()


class _Probe(Daemon):
    name = "probe-daemon"

    def __init__(self, target) -> None:
        super().__init__(settings=None, config_path=Path("/nonexistent"))
        self.target = target

    def start(self) -> None:
        self.spawn("probe", self.target)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread's end is the point
def test_a_worker_thread_that_ends_stops_the_daemon_with_exit_1(caplog):
    def work() -> None:
        raise SystemExit(3)  # not an Exception: the Worker cannot catch it, and the thread ends

    daemon = _Probe(work)
    guard = threading.Timer(30, daemon.request_stop)  # the test ends even if the daemon never notices
    guard.start()
    caplog.set_level(logging.ERROR, logger="otad")
    try:
        code = daemon.run()
    finally:
        guard.cancel()
    assert code == 1
    assert any("probe thread ended unexpectedly" in r.getMessage() for r in caplog.records)


def test_a_worker_that_keeps_failing_is_shown_in_status(caplog):
    def work() -> None:
        raise OSError(28, "No space left on device")

    daemon = _Probe(work)
    daemon.start()
    try:
        status = wait_until(lambda: "probe failed" in daemon._full_status() and daemon._full_status(), 10,
                            "STATUS text naming the failing worker")
        assert "probe failed 1x" in status and "OSError: [Errno 28] No space left on device" in status
        assert daemon.workers[0].is_alive()
    finally:
        daemon.request_stop()
        daemon.workers[0].wake()
        daemon.workers[0].join(10)
