"""ChildSupervisor: the one supervisor behind the worker and the receiver processes."""

from __future__ import annotations

import logging
import sys
import time

from dicom_node.service import ChildSupervisor

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def test_restarts_a_dead_child_and_stops_them_all(caplog):
    caplog.set_level(logging.INFO, logger="dicom_node.service")
    sup = ChildSupervisor("receiver", SLEEPER, 2, numbered=True)
    try:
        sup.ensure_running()
        first = [p.pid for p in sup.procs if p is not None]
        assert len(first) == 2 and sup.restarts == 0
        sup.ensure_running()  # both alive: nothing started
        assert [p.pid for p in sup.procs if p is not None] == first
        dead = sup.procs[1]
        assert dead is not None
        dead.kill()
        dead.wait(10)
        sup.ensure_running()
        again = [p.pid for p in sup.procs if p is not None]
        assert again[0] == first[0] and again[1] != first[1] and sup.restarts == 1
        assert "receiver 2 exited code=-9; restarting" in caplog.text
        assert f"receiver 2 started pid={again[1]}" in caplog.text
    finally:
        sup.stop()
    assert all(p is not None and p.poll() is not None for p in sup.procs)
    sup.ensure_running()  # stopped: never started again
    assert [p.pid for p in sup.procs if p is not None] == again


def test_a_single_child_is_logged_by_its_name(caplog):
    caplog.set_level(logging.INFO, logger="dicom_node.service")
    sup = ChildSupervisor("worker", SLEEPER)
    try:
        sup.ensure_running()
        proc = sup.procs[0]
        assert proc is not None and f"worker started pid={proc.pid}" in caplog.text
    finally:
        sup.stop()


def test_a_child_that_does_not_stop_is_killed_after_its_grace(caplog, tmp_path):
    """An applier starved of CPU (or stuck) must not hold up a stop: after the grace it
    is killed, and ``cspine serve`` applies what it left (tested in test_apply)."""
    caplog.set_level(logging.INFO, logger="dicom_node.service")
    deaf = [
        sys.executable,
        "-c",
        "import os, signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "open(os.path.join(sys.argv[1], str(os.getpid())), 'w').close(); time.sleep(60)",
        str(tmp_path),
    ]
    sup = ChildSupervisor("applier", deaf, 2, numbered=True, stop_grace_s=1.0)
    sup.ensure_running()
    deadline = time.monotonic() + 30
    while len(list(tmp_path.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)  # both children ignore SIGTERM from here on
    t0 = time.monotonic()
    sup.stop()
    assert time.monotonic() - t0 < 5  # one grace for all, not one per child
    assert all(p is not None and p.returncode == -9 for p in sup.procs)
    assert "applier 1 did not stop within 1 s; killing it" in caplog.text
