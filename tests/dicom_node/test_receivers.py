"""Several receiver processes on one port (``node.receivers``): ``cspine serve`` for real."""

from __future__ import annotations

import os
import re
import signal
import socket
import struct
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from config import load_settings
from config.digest import sha256_file
from dicom_node.receive import open_node_storage
from storage.models import Instance
from tests.conftest import free_port
from tests.dicom_node.proc import Server, echo_ok
from tests.dicom_node.scu_tools import associate, send_until_refused, store_files
from tests.helpers import write_series

# 2 processes; max_associations (20) holds for the two together
RECEIVERS = {"CSPINE_NODE__RECEIVERS": "2", "CSPINE_NODE__MAX_ASSOCIATIONS": "20"}


def _pids(log: str, what: str) -> set[int]:
    return {int(m) for m in re.findall(rf"{what}.*? pid=(\d+)", log)}


def _start(server: Server) -> Server:
    """Start and wait until both processes listen."""
    before = len(server.log()) if server.log_path.exists() else 0
    server.start()
    deadline = time.monotonic() + 60
    while len(_pids(server.log()[before:], "listening ae_title")) < 2:
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"the second receiver never listened: {server.log()[-2000:]}")
        time.sleep(0.1)
    return server


def _catalog(data_dir: Path) -> tuple[dict[str, str], set[str], list[Path]]:
    """``{uid: file_path}`` of every row (files checked against their sha256), the
    instance files on disk, and what is left in the spool."""
    settings = load_settings(overrides={"storage": {"data_dir": str(data_dir)}}, environ={})
    catalog, store = open_node_storage(settings)
    try:
        with catalog.read() as session:
            rows = list(session.scalars(select(Instance)))
        for row in rows:
            assert sha256_file(store.root / row.file_path) == row.sha256
        files = set(store.iter_instance_files())
        return {r.sop_instance_uid: r.file_path for r in rows}, files, list(store.tmp_dir.iterdir())
    finally:
        catalog.dispose()


def _send_concurrently(port: int, groups: list[list[Path]]) -> list[list[int | None]]:
    results: list[list[int | None]] = [[] for _ in groups]
    start = threading.Barrier(len(groups))

    def send(i: int) -> None:
        start.wait()
        results[i] = store_files(port, groups[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(groups))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def test_two_receivers_share_the_port_and_every_ack_is_cataloged(tmp_path):
    paths = write_series(tmp_path / "series", 24, rows=64, cols=64)
    data_dir = tmp_path / "var"
    server = _start(Server(data_dir, free_port(), "--no-worker", env=RECEIVERS))
    try:
        for _ in range(3):  # three waves of 8 concurrent associations
            wave, paths = paths[:8], paths[8:]
            statuses = _send_concurrently(server.port, [[p] for p in wave])
            assert statuses == [[0]] * 8
        log = server.log()
    finally:
        server.stop()
    assert len(_pids(log, "listening ae_title")) == 2
    # both processes took associations
    assert len(_pids(log, "association accepted")) == 2, log[-3000:]
    rows, files, spool = _catalog(data_dir)
    assert len(rows) == 24
    assert files == set(rows.values()) and spool == []


def test_associations_are_spread_evenly_over_the_receivers(tmp_path):
    """Six associations opened one after another and kept open land three on each
    receiver: a receiver already serving more waits before it accepts (left to the race
    of the woken processes, one often took most of them)."""
    server = _start(Server(tmp_path / "var", free_port(), "--no-worker", env=RECEIVERS))
    held = []
    try:
        before = len(server.log())
        for _ in range(6):
            assoc = associate(server.port)
            assert assoc.is_established
            held.append(assoc)
        deadline = time.monotonic() + 10
        while server.log()[before:].count("association accepted") < 6:
            assert time.monotonic() < deadline, server.log()[-2000:]
            time.sleep(0.05)
        accepted = re.findall(r"association accepted .*? pid=(\d+)", server.log()[before:])
    finally:
        for assoc in held:
            assoc.release()
        server.stop()
    per_process = sorted(accepted.count(pid) for pid in set(accepted))
    assert per_process == [3, 3], accepted


def test_a_dead_receiver_is_restarted_and_receivers_die_with_serve(tmp_path):
    data_dir = tmp_path / "var"
    server = _start(Server(data_dir, free_port(), "--no-worker", env=RECEIVERS))
    try:
        started = re.findall(r"receiver 1 started pid=(\d+)", server.log())
        assert len(started) == 1
        child = int(started[0])
        os.kill(child, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            again = re.findall(r"receiver 1 started pid=(\d+)", server.log())
            if len(again) == 2:
                break
            time.sleep(0.2)
        assert len(again) == 2, server.log()[-2000:]
        assert "receiver 1 exited code=-9; restarting" in server.log()
        replacement = int(again[1])
        assert echo_ok(server.port)
    finally:
        server.kill()  # SIGKILL: the kernel must take the receivers down with it
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and Path(f"/proc/{replacement}").exists():
        time.sleep(0.1)
    status = Path(f"/proc/{replacement}/status")
    assert not status.exists() or "State:\tZ" in status.read_text()


def _send_until_broken(port: int, paths: list[Path]) -> list[str]:
    assoc = associate(port)
    if not assoc.is_established:
        return []
    acked = send_until_refused(assoc, paths)
    if assoc.is_established:
        assoc.release()
    return acked


@pytest.mark.parametrize(
    ("acknowledge", "point"), [("catalog", "before-commit"), ("journal", "before-response")]
)
def test_kill_points_with_two_receivers_lose_nothing_acknowledged(tmp_path, acknowledge, point):
    """Every receiver SIGKILLs itself with its 2nd instance: between rename and commit
    (catalog), or with the entry durable in the journal and the answer not sent."""
    paths = write_series(tmp_path / "series", 16, rows=64, cols=64)
    data_dir = tmp_path / "var"
    port = free_port()
    mode = {"CSPINE_STORAGE__ACKNOWLEDGE": acknowledge}
    armed = _start(
        Server(
            data_dir,
            port,
            "--no-worker",
            env={**RECEIVERS, **mode, "CSPINE_FAULT_KILL_AT": f"{point}:2"},
        )
    )
    acked: list[list[str]] = [[] for _ in range(4)]
    try:
        groups = [paths[i::4] for i in range(4)]

        def send(i: int) -> None:
            acked[i] = _send_until_broken(port, groups[i])

        threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        log = armed.log()
    finally:
        armed.kill()
    assert f"fault injection: SIGKILL at {point}" in log
    confirmed = {uid for group in acked for uid in group}
    assert len(confirmed) < len(paths)  # the kills did cut transfers
    # restart (the start-up repair and replay run) and check what was acknowledged
    server = _start(Server(data_dir, port, "--no-worker", env={**RECEIVERS, **mode}))
    try:
        rows, files, spool = _catalog(data_dir)
        assert confirmed <= set(rows)
        assert files == set(rows.values()) and spool == []  # no orphan, no phantom
        assert _send_concurrently(port, [paths[i::4] for i in range(4)]) == [[0] * 4] * 4
    finally:
        server.stop()
    rows, files, spool = _catalog(data_dir)
    assert len(rows) == len(paths) and files == set(rows.values()) and spool == []


def test_serve_starts_again_on_its_port_while_a_killed_serves_receiver_is_starting(tmp_path):
    """SIGKILL ``cspine serve`` as soon as it answers, while its second receiver is still
    starting (it holds the inherited listening socket until it finds its parent gone),
    and start it again at once on the same port: it waits for the port, not fails."""
    data_dir = tmp_path / "var"
    port = free_port()
    first = Server(data_dir, port, "--no-worker", env=RECEIVERS).start()
    first.kill()
    second = _start(Server(data_dir, port, "--no-worker", env=RECEIVERS))
    try:
        assert echo_ok(port)
    finally:
        second.stop()


def test_max_associations_holds_for_the_node_not_each_receiver(tmp_path):
    """Three associations at most, over two processes: a share of two each would let a
    fourth in; the node-wide count refuses it (2, 3, 2) however the kernel spread the
    first three, and takes a new one once one of them has ended."""
    env = {**RECEIVERS, "CSPINE_NODE__MAX_ASSOCIATIONS": "3"}
    server = _start(Server(tmp_path / "var", free_port(), "--no-worker", env=env))
    held = []
    try:
        for _ in range(3):
            held.append(associate(server.port))
            assert held[-1].is_established
        extra = associate(server.port)
        assert extra.is_rejected
        rj = extra.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (2, 3, 2)
        assert "association rejected reason=too-many-associations" in server.log()
        held.pop().release()
        deadline = time.monotonic() + 10
        again = associate(server.port)
        while not again.is_established and time.monotonic() < deadline:
            time.sleep(0.2)  # until the ended one's close is counted
            again = associate(server.port)
        assert again.is_established
        held.append(again)
        assert associate(server.port).is_rejected
    finally:
        for assoc in held:
            if assoc.is_established:
                assoc.release()
        server.stop()


def _connections(data_dir: Path) -> int:
    """The connections counted by all the receiver processes (their shared count)."""
    raw = (data_dir / "run" / "associations").read_bytes()
    return sum(struct.unpack(f"<{len(raw) // 8}q", raw))


def test_a_connection_flood_is_cut_for_the_node_not_each_receiver(tmp_path):
    """``2 x max_associations + 2`` open connections in both processes together: the next
    is closed at once, whichever process accepts it."""
    env = {**RECEIVERS, "CSPINE_NODE__MAX_ASSOCIATIONS": "1", "CSPINE_NODE__ACSE_TIMEOUT": "5"}
    data_dir = tmp_path / "var"
    server = _start(Server(data_dir, free_port(), "--no-worker", env=env))
    cap = 2 * 1 + 2
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(cap)]
    try:
        deadline = time.monotonic() + 5
        while _connections(data_dir) < cap and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _connections(data_dir) == cap
        with socket.create_connection(("127.0.0.1", server.port)) as extra:
            extra.settimeout(2)
            assert extra.recv(1) == b""  # closed at once, not after the ACSE timeout
    finally:
        for s in idle:
            s.close()
        server.stop()


def test_serve_with_the_defaults_starts_two_receivers_per_core(tmp_path):
    from config.settings import auto_receivers

    server = Server(tmp_path / "var", free_port(), "--no-worker")
    server.env.pop("CSPINE_NODE__RECEIVERS", None)  # the suite's own count (tests/conftest.py)
    server.start()
    try:
        expected = auto_receivers()
        assert expected == min(2 * len(os.sched_getaffinity(0)), 8)
        deadline = time.monotonic() + 60
        while len(_pids(server.log(), "listening ae_title")) < expected:
            assert time.monotonic() < deadline, server.log()[-2000:]
            time.sleep(0.1)
        time.sleep(0.5)  # no more than that
        assert len(_pids(server.log(), "listening ae_title")) == expected
        assert echo_ok(server.port)
    finally:
        server.stop()
