"""Faults while receiving: aborted associations, low disk space, a locked catalog.

After each fault nothing partial remains (no row, no store file, no spool file), what
was acknowledged before is intact, and the node still answers another peer's C-ECHO.
"""

from __future__ import annotations

import errno
import itertools
import socket
import sqlite3
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import _config
from pynetdicom.pdu import A_ABORT_RQ
from sqlalchemy import select

from config.digest import sha256_file
from dicom_node import store_rq
from dicom_node.receive import Receiver
from dicom_node.scp import StorageNode
from storage import Catalog
from storage.filestore import FileStore
from storage.models import Instance, Refusal
from tests.dicom_node.conftest import RunningNode, make_settings
from tests.dicom_node.scu_tools import associate, chunked_send, partial_store, store_files
from tests.helpers import ct_slice, write_series


def _rows(running) -> list[Instance]:
    with running.receiver.catalog.read() as s:
        return list(s.scalars(select(Instance)))


def _leftovers(running) -> tuple[list[Path], list[Path]]:
    root = running.store_root
    files = [p for area in ("instances", "quarantine") for p in (root / area).rglob("*.dcm")]
    return files, list((root / "tmp").iterdir())


def assert_other_peer_served(port: int) -> None:
    """A C-ECHO from another calling AE succeeds."""
    assoc = associate(port, calling="OTHERPEER")
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0
    finally:
        assoc.release()


def latest_refusal(receiver) -> Refusal | None:
    """The newest row of the catalog's refusals table."""
    with receiver.catalog.read() as s:
        return s.scalars(select(Refusal).order_by(Refusal.id.desc()).limit(1)).first()


def assert_intact(running, expected: int) -> None:
    rows = _rows(running)
    assert len(rows) == expected
    for row in rows:
        assert sha256_file(running.store_root / row.file_path) == row.sha256
    files, tmp = _leftovers(running)
    assert sorted(str(p.relative_to(running.store_root)) for p in files) == sorted(
        r.file_path for r in rows
    )
    assert tmp == []


def _wait_no_spool(running, timeout: float = 10) -> None:
    """Wait until the node has closed every association and its spool is empty."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not running.node._server.active_associations and not _leftovers(running)[1]:
            return
        time.sleep(0.05)


@pytest.mark.parametrize("ending", ["abort", "reset", "stall"])
def test_association_ended_mid_transfer_leaves_nothing_partial(start_node, tmp_path, ending):
    running = start_node(node={"network_timeout": 1.0})
    first = write_series(tmp_path / "ok", 2)
    assert store_files(running.port, first) == [0, 0]
    ds = ct_slice(generate_uid(), generate_uid(), 0, rows=256, cols=256)
    sock = partial_store(running.port, ds, 0.5)
    deadline = time.monotonic() + 5
    while not _leftovers(running)[1] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _leftovers(running)[1], "the partial data set is being spooled"
    if ending == "abort":  # the peer sends A-ABORT
        abort = A_ABORT_RQ()
        abort.source, abort.reason_diagnostic = 0, 0
        sock.sendall(abort.encode())
    elif ending == "reset":  # the peer's TCP connection is reset
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    else:  # the peer stalls: the node gives up after its network timeout and aborts
        sock.settimeout(10)
        got = b""
        while data := sock.recv(1024):
            got += data
        assert got[:1] == b"\x07", "the node sends an A-ABORT"
    sock.close()
    _wait_no_spool(running)
    assert_intact(running, 2)  # the earlier instances intact, the cut-off one absent
    assert_other_peer_served(running.port)
    assert store_files(running.port, first) == [0, 0]  # and it still stores


def test_storescu_abort_instead_of_release_keeps_every_acknowledged(node, tmp_path):
    paths = write_series(tmp_path / "in", 8, rows=128, cols=128)
    run = subprocess.run(
        ["storescu", "--abort", "-aec", "CSPINE", "127.0.0.1", str(node.port), *map(str, paths)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    _wait_no_spool(node)
    assert_intact(node, 8)
    uids = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths}
    assert {r.sop_instance_uid for r in _rows(node)} == uids
    assert_other_peer_served(node.port)


def test_free_space_below_threshold_gives_a700_and_corrupts_nothing(start_node, tmp_path):
    ok = start_node()
    assert store_files(ok.port, write_series(tmp_path / "a", 3)) == [0, 0, 0]
    ok.node.stop()
    # same data folder, a threshold above what the real filesystem has free
    full = start_node(storage={"min_free_bytes": 10**18})
    paths = write_series(tmp_path / "b", 2)
    assoc = associate(full.port)
    with chunked_send():
        responses = [assoc.send_c_store(p) for p in paths]
    assoc.release()
    assert [r.Status for r in responses] == [0xA700, 0xA700]
    assert all(r.ErrorComment == "not enough free disk space" for r in responses)
    assert_intact(full, 3)
    assert_other_peer_served(full.port)


def test_disk_full_during_the_write_gives_a700_and_leaves_nothing(node, tmp_path, monkeypatch):
    def no_space(self, src, area, sha256):  # the rename target's filesystem is full
        raise OSError(errno.ENOSPC, "No space left on device")

    assert store_files(node.port, write_series(tmp_path / "a", 1)) == [0]
    monkeypatch.setattr(FileStore, "_place", no_space)
    assert store_files(node.port, write_series(tmp_path / "b", 2)) == [0xA700, 0xA700]
    assert_intact(node, 1)
    assert_other_peer_served(node.port)


def test_disk_full_while_spooling_aborts_and_leaves_nothing(node, tmp_path, monkeypatch):
    """ENOSPC while a data set is still arriving: nothing was checked or answered yet, so
    the association is aborted (A-P-ABORT) and the half-written spool file removed."""
    assert store_files(node.port, write_series(tmp_path / "a", 1)) == [0]
    written = store_rq.SpoolFile.write
    calls = itertools.count()

    def filling(self, data):  # the File Meta and one fragment fit, then the disk is full
        if next(calls) >= 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        written(self, data)

    monkeypatch.setattr(store_rq.SpoolFile, "write", filling)
    assoc = associate(node.port)
    with chunked_send():
        rsp = assoc.send_c_store(write_series(tmp_path / "b", 1, rows=512, cols=512)[0])
    assert "Status" not in rsp  # no answer: the association ended
    deadline = time.monotonic() + 10
    while not assoc.is_aborted and time.monotonic() < deadline:  # the SCU's thread notes it
        time.sleep(0.02)
    assert assoc.is_aborted
    assert next(calls) > 2, "the spool write was reached"
    monkeypatch.undo()
    _wait_no_spool(node)
    assert_intact(node, 1)
    assert_other_peer_served(node.port)
    assert store_files(node.port, write_series(tmp_path / "c", 1)) == [0]


def _hold_write_lock(db: Path, seconds: float, holding: threading.Event) -> None:
    conn = sqlite3.connect(db, timeout=30, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    holding.set()
    time.sleep(seconds)
    conn.execute("COMMIT")
    conn.close()


def _store_during_lock(running, paths, seconds: float) -> tuple[list[int | None], float]:
    holding = threading.Event()
    db = Path(running.settings.storage.data_dir) / "catalog.sqlite"
    locker = threading.Thread(target=_hold_write_lock, args=(db, seconds, holding))
    locker.start()
    assert holding.wait(10)
    t0 = time.monotonic()
    assoc = associate(running.port)
    assoc.dimse_timeout = 60  # the node may take as long as its busy deadline
    statuses = []
    with chunked_send():
        for path in paths:
            rsp = assoc.send_c_store(path)
            statuses.append(int(rsp.Status) if "Status" in rsp else None)
    assoc.release()
    elapsed = time.monotonic() - t0
    locker.join()
    return statuses, elapsed


def test_catalog_write_lock_held_10s_stores_slower_never_c211(node, tmp_path):
    paths = write_series(tmp_path / "in", 4)
    statuses, elapsed = _store_during_lock(node, paths, 10.0)
    assert statuses == [0, 0, 0, 0]  # succeeded, only later
    assert elapsed > 8.0  # they really waited for the lock
    assert_intact(node, 4)


def test_catalog_locked_past_the_deadline_gives_a700_not_c211(tmp_path):
    # a node whose catalog gives up after 0.5 s (+ one 0.25 s busy wait), not 20 s
    settings = make_settings(tmp_path)
    catalog = Catalog(settings.storage.url, busy_deadline_s=0.5, busy_timeout_ms=250)
    store = FileStore(settings.storage.store_path)
    receiver = Receiver(settings, catalog, store, environ={})
    running = RunningNode(settings, StorageNode(settings, receiver), receiver, None)
    old_tempdir, old_chunked = tempfile.tempdir, _config.STORE_RECV_CHUNKED_DATASET
    running.node.start()
    try:
        paths = write_series(tmp_path / "in", 2)
        statuses, _ = _store_during_lock(running, paths, 1.5)
        assert statuses[0] == 0xA700  # out of resources: the sender retries later
        assert 0xC211 not in statuses and None not in statuses
        assert_intact(running, statuses.count(0))  # the refused one left no file behind
        assert store_files(running.port, paths) == [0, 0]  # the retry succeeds
        assert_intact(running, 2)
        assert_other_peer_served(running.port)
    finally:
        running.node.stop()
        catalog.dispose()
        tempfile.tempdir, _config.STORE_RECV_CHUNKED_DATASET = old_tempdir, old_chunked


def test_postgresql_unreachable_gives_a700_never_an_ack(start_node, tmp_path):
    """The catalog's PostgreSQL server stops while the node serves: C-STOREs are answered
    0xA700 (the sender keeps them and retries), nothing is left in the store or spool,
    C-ECHO is still answered; once the server is back the same instances are stored."""
    from tests.storage.pg import PostgresServer, require_postgres

    server = PostgresServer(require_postgres())
    server.start()
    try:
        running = start_node(storage={"database_url": server.create_database()})
        paths = write_series(tmp_path / "in", 3)
        assert store_files(running.port, paths[:1]) == [0]
        server.halt()
        assert store_files(running.port, paths[1:]) == [0xA700, 0xA700]
        files, tmp = _leftovers(running)
        assert len(files) == 1 and tmp == []
        assert_other_peer_served(running.port)
        server.start_again()
        assert store_files(running.port, paths[1:]) == [0, 0]
        assert_intact(running, 3)
    finally:
        server.stop()


def test_refusals_table_stays_bounded_under_a_flood(tmp_path, monkeypatch):
    import storage.catalog as catalog_module

    monkeypatch.setattr(catalog_module, "REFUSALS_KEPT", 10)
    settings = make_settings(tmp_path)
    catalog = Catalog(settings.storage.url)
    try:
        for _ in range(210):
            catalog_module.record_refusal(catalog, 0xA900, "x", "FLOOD", None)
        with catalog.read() as s:
            ids = list(s.scalars(select(Refusal.id)))
    finally:
        catalog.dispose()
    assert max(ids) == 210 and len(ids) <= 10 + 100  # pruned every 100 rows


def test_cspine_status_lists_recent_refusals(start_node, tmp_path):
    from dicom_node.reports import status_lines
    from storage.jobs import status_report
    from tests.dicom_node.proc import cspine

    node = start_node()
    ds = ct_slice(generate_uid(), generate_uid(), 0)
    del ds.PixelData
    path = tmp_path / "no-pixels.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert store_files(node.port, [path]) == [0xA900]
    lines = list(status_lines(status_report(node.receiver.catalog)))
    assert "recent refusals on receipt:" in lines
    assert any("0xA900" in line and "Pixel Data" in line for line in lines), lines
    out = cspine("status", "--data-dir", str(node.settings.storage.data_dir))
    assert out.returncode == 0 and "0xA900" in out.stdout, out.stderr
