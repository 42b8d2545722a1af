"""SIGKILL the real server mid-ingest; every acknowledged instance must survive (with the
catalog on SQLite and on PostgreSQL)."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import select

from config.digest import sha256_file
from dicom_node.receive import open_node_storage
from storage.models import Instance
from tests.conftest import free_port
from tests.dicom_node.proc import Server
from tests.dicom_node.scu_tools import associate, send_until_refused
from tests.helpers import write_series


def _send_until_killed(server: Server, paths, kill_after: int | None, kill_delay: float | None):
    """Send paths; SIGKILL the server after `kill_after` acks or after `kill_delay` s."""
    assoc = associate(server.port)
    assert assoc.is_established
    if kill_delay is not None:
        threading.Timer(kill_delay, server.kill).start()

    def on_ack(acked: list[str]) -> None:
        if kill_after is not None and len(acked) == kill_after:
            server.kill()

    acked = send_until_refused(assoc, paths, on_ack)
    if assoc.is_established:
        assoc.abort()
    server.kill()
    return acked


@pytest.mark.slow
def test_sigkill_during_ingest_loses_nothing_acknowledged(tmp_path, database_url):
    data_dir = tmp_path / "var"
    paths = write_series(tmp_path / "series", 60, rows=256, cols=256)
    port = free_port()
    # one host: its start-up repair removes every unrecorded file at once
    env = {
        "CSPINE_STORAGE__DATABASE_URL": database_url,
        "CSPINE_STORAGE__ORPHAN_GRACE_SECONDS": "0",
    }
    server = Server(data_dir, port, "--no-worker", "--stable-seconds", "600", env=env)
    all_acked: set[str] = set()
    rounds = [(1, None), (7, None), (None, 0.05), (None, 0.12), (15, None)]
    for kill_after, kill_delay in rounds:
        server.start()
        acked = _send_until_killed(server, paths, kill_after, kill_delay)
        # the kill really lands mid-association
        assert len(acked) < len(paths)
        if kill_after is not None:
            assert len(acked) == kill_after
        all_acked |= set(acked)
    server.start()  # restart: reconcile runs before listening
    server.stop()

    settings_overrides = {"storage": {"data_dir": str(data_dir), "database_url": database_url}}
    from config import load_settings

    catalog, store = open_node_storage(load_settings(overrides=settings_overrides, environ={}))
    with catalog.read() as s:
        rows = list(s.scalars(select(Instance)))
    by_uid = {r.sop_instance_uid: r for r in rows}
    # 1. every acknowledged instance is in the catalog and on disk, intact
    assert all_acked, "the test must acknowledge some instances"
    missing = all_acked - set(by_uid)
    assert not missing, f"{len(missing)} acknowledged instances lost"
    for row in rows:
        path = store.root / row.file_path
        assert path.is_file()
        assert sha256_file(path) == row.sha256  # 2. nothing half-present
    # 3. no temp file and no unrecorded store file left behind
    assert list(store.tmp_dir.iterdir()) == []
    on_disk = set(store.iter_instance_files())
    assert on_disk == {r.file_path for r in rows}
    catalog.dispose()
    assert "Traceback" not in server.log()
