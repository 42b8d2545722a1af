"""SIGKILL of ``cspine serve`` at each named step of receiving (deterministic kill points).

``CSPINE_FAULT_KILL_AT=<point>:<n>`` makes the server SIGKILL itself when the n-th
instance reaches ``<point>`` (see :data:`dicom_node.receive.KILL_POINTS`). For each
point: send a series, see the kill land exactly there (the leftovers on disk prove
where), restart, and check that every acknowledged instance is present and intact,
that no orphan file or phantom row remains, and that re-sending completes the series.
Each point runs with the catalog on SQLite and on a real PostgreSQL.
"""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from config import load_settings
from config.digest import sha256_file
from dicom_node.receive import KILL_POINTS, Receiver, parse_kill_point
from dicom_node.receive import open_node_storage as open_storage
from storage.journal import Journal
from storage.models import Instance
from tests.conftest import free_port
from tests.dicom_node.proc import Server, echo_ok
from tests.dicom_node.scu_tools import associate, chunked_send
from tests.helpers import write_series

KILL_AT = 3  # the third instance of the series dies at the point


def _send(port: int, paths: list[Path]) -> tuple[list[str], bool]:
    """Send over one association; return the acknowledged UIDs and whether it broke."""
    acked: list[str] = []
    assoc = associate(port)
    assert assoc.is_established
    broke = False
    with chunked_send():
        for path in paths:
            try:
                rsp = assoc.send_c_store(path)
            except Exception:
                broke = True
                break
            if rsp.get("Status") != 0:
                broke = True
                break
            acked.append(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    if assoc.is_established:
        assoc.release()
    return acked, broke


def _state(data_dir: Path, url: str) -> tuple[dict[str, Instance], set[str], list[Path]]:
    settings = load_settings(
        overrides={"storage": {"data_dir": str(data_dir), "database_url": url}}, environ={}
    )
    catalog, store = open_storage(settings)
    try:
        with catalog.read() as s:
            rows = {r.sop_instance_uid: r for r in s.scalars(select(Instance))}
        for row in rows.values():
            assert sha256_file(store.root / row.file_path) == row.sha256
        return rows, set(store.iter_instance_files()), list(store.tmp_dir.iterdir())
    finally:
        catalog.dispose()


def _env(database_url: str, acknowledge: str) -> dict[str, str]:
    # one host: its start-up repair may remove every unrecorded file at once
    return {
        "CSPINE_STORAGE__DATABASE_URL": database_url,
        "CSPINE_STORAGE__ORPHAN_GRACE_SECONDS": "0",
        "CSPINE_STORAGE__ACKNOWLEDGE": acknowledge,
    }


def _killed_at(
    point: str, data_dir: Path, port: int, paths: list[Path], env: dict[str, str]
) -> list[str]:
    """Serve armed at ``point`` for the KILL_AT-th instance, send, see it die there;
    the UIDs acknowledged before."""
    armed = Server(
        data_dir,
        port,
        "--no-worker",
        "--stable-seconds",
        "600",
        env={"CSPINE_FAULT_KILL_AT": f"{point}:{KILL_AT}", **env},
    ).start()
    try:
        acked, broke = _send(port, paths)
        assert armed.proc is not None
        assert armed.proc.wait(10) == -9  # it really died by SIGKILL
    finally:
        armed.kill()  # a server that missed its kill point must not outlive the test
    assert broke and len(acked) == KILL_AT - 1  # killed on the third instance, no response
    assert f"fault injection: SIGKILL at {point} (instance {KILL_AT})" in armed.log()
    return acked


@pytest.mark.parametrize("point", KILL_POINTS)
def test_sigkill_at_each_receive_step_loses_nothing_acknowledged(tmp_path, point, database_url):
    paths = write_series(tmp_path / "series", 6, rows=64, cols=64)
    data_dir = tmp_path / "var"
    port = free_port()
    catalog_env = _env(database_url, "catalog")  # these points are the catalog mode's
    acked = _killed_at(point, data_dir, port, paths, catalog_env)

    # the leftovers show where it died, before any repair
    rows, files, tmp = _state(data_dir, database_url)
    orphans = files - {r.file_path for r in rows.values()}
    expected = {
        "after-temp-write": (KILL_AT - 1, 0, 1),  # (rows, orphan store files, spool files)
        "before-rename": (KILL_AT - 1, 0, 1),
        "before-commit": (KILL_AT - 1, 1, 0),
        "before-response": (KILL_AT, 0, 0),  # committed but never acknowledged
    }[point]
    assert (len(rows), len(orphans), len(tmp)) == expected

    # restart without the hook: start-up repair, then the sender retries everything
    server = Server(
        data_dir, port, "--no-worker", "--stable-seconds", "600", env=catalog_env
    ).start()
    try:
        rows, files, tmp = _state(data_dir, database_url)
        assert set(acked) <= set(rows)  # every acknowledged instance survived, intact
        assert files == {r.file_path for r in rows.values()} and tmp == []  # no orphan
        again, broke = _send(port, paths)
        assert not broke and len(again) == len(paths)
        assert echo_ok(port)
    finally:
        server.stop()
    rows, files, tmp = _state(data_dir, database_url)
    sent = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths}
    assert set(rows) == sent and len(files) == len(paths) and tmp == []
    assert "Traceback" not in server.log()


def _journal_state(data_dir: Path, url: str) -> tuple[dict[str, Instance], set[str], int, int]:
    """Rows, store files, journal entries and spool files, before any repair."""
    rows, files, tmp = _state(data_dir, url)
    entries = Journal(data_dir / "store", fsync=False).count()
    return rows, files, entries, len(tmp)


@pytest.mark.parametrize(
    ("point", "flush"),
    [
        ("before-journal-rename", "file"),
        ("before-response", "file"),
        ("before-response", "filesystem"),  # storage.journal_flush: one syncfs
    ],
)
def test_sigkill_at_each_journal_step_loses_nothing_acknowledged(
    tmp_path, point, flush, database_url
):
    """``storage.acknowledge = "journal"``: a torn append, and a journaled instance whose
    answer never left; the applier may have cataloged any entry before the kill."""
    paths = write_series(tmp_path / "series", 6, rows=64, cols=64)
    data_dir = tmp_path / "var"
    port = free_port()
    env = {**_env(database_url, "journal"), "CSPINE_STORAGE__JOURNAL_FLUSH": flush}
    acked = _killed_at(point, data_dir, port, paths, env)

    rows, _files, entries, spool = _journal_state(data_dir, database_url)
    # every instance that reached the journal is a row or still an entry; a torn
    # append left its flushed spool file, never renamed and never answered
    journaled = KILL_AT - 1 if point == "before-journal-rename" else KILL_AT
    assert (len(rows) + entries, spool) == (journaled, 1 if journaled < KILL_AT else 0)

    server = Server(data_dir, port, "--no-worker", "--stable-seconds", "600", env=env).start()
    try:
        rows, files, entries, spool = _journal_state(data_dir, database_url)
        assert set(acked) <= set(rows) and len(rows) == journaled  # replayed before listening
        assert (entries, spool) == (0, 0) and files == {r.file_path for r in rows.values()}
        again, broke = _send(port, paths)
        assert not broke and len(again) == len(paths)
        _wait_applied(data_dir, database_url, len(paths))
    finally:
        server.stop()
    rows, files, entries, spool = _journal_state(data_dir, database_url)
    assert len(rows) == len(paths) and len(files) == len(paths) and (entries, spool) == (0, 0)
    assert "Traceback" not in server.log()


def test_sigkill_between_answer_and_apply_is_replayed_at_start(tmp_path):
    """The applier dies at every entry (so nothing is cataloged), then the whole node is
    SIGKILLed with every instance answered: the restart catalogs all of them."""
    paths = write_series(tmp_path / "series", 6, rows=64, cols=64)
    data_dir = tmp_path / "var"
    port = free_port()
    url = f"sqlite:///{data_dir / 'catalog.sqlite'}"
    env = {"CSPINE_STORAGE__ACKNOWLEDGE": "journal"}
    armed = Server(
        data_dir,
        port,
        "--no-worker",
        "--stable-seconds",
        "600",
        env={"CSPINE_FAULT_KILL_AT": "apply-before-commit:1", **env},
    ).start()
    acked, broke = _send(port, paths)
    assert not broke and len(acked) == len(paths)
    deadline = time.monotonic() + 30
    while "SIGKILL at apply-before-commit (instance 1)" not in armed.log():
        assert time.monotonic() < deadline, "the applier never reached the kill point"
        time.sleep(0.1)
    armed.kill()
    rows, _files, entries, _spool = _journal_state(data_dir, url)
    assert (len(rows), entries) == (0, len(paths))  # answered, none cataloged
    server = Server(data_dir, port, "--no-worker", "--stable-seconds", "600", env=env).start()
    try:
        rows, files, entries, spool = _journal_state(data_dir, url)
        assert set(rows) == set(acked) and (entries, spool) == (0, 0)
        assert files == {r.file_path for r in rows.values()}  # the applier's orphan is reused
        assert "journal replayed entries=6 stored=6" in server.log()
    finally:
        server.stop()


def _wait_applied(data_dir: Path, url: str, count: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows, _files, entries, _spool = _journal_state(data_dir, url)
        if len(rows) == count and entries == 0:
            return
        time.sleep(0.1)
    raise AssertionError(f"the applier did not catalog {count} instances in {timeout} s")


def test_kill_point_hook_is_inert_unless_set(tmp_path):
    assert parse_kill_point(None) is None and parse_kill_point("") is None
    assert parse_kill_point("before-commit") == ("before-commit", 1)
    assert parse_kill_point("before-rename:4") == ("before-rename", 4)
    for bad in ("nowhere", "before-commit:0", "before-commit:x"):
        with pytest.raises(ValueError, match="CSPINE_FAULT_KILL_AT"):
            parse_kill_point(bad)
    settings = load_settings(overrides={"storage": {"data_dir": str(tmp_path)}}, environ={})
    catalog, store = open_storage(settings)
    try:
        receiver = Receiver(settings, catalog, store, environ={})
        assert receiver._checkpoint is None
        env = {"CSPINE_FAULT_KILL_AT": "before-commit"}
        armed = Receiver(settings, catalog, store, environ=env)
        assert armed._checkpoint is not None
    finally:
        catalog.dispose()
