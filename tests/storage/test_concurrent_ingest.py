"""Receivers racing on one catalog (threads of two processes' worth of engines), on
SQLite and on a real PostgreSQL: the duplicate and mismatch rules rest on the unique
constraints, so every race ends as if one receiver had come second."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from storage import Catalog, CatalogBusyError, FileStore, IngestOutcome, filestore, ingest
from storage.catalog import InstanceHeader, is_known
from storage.models import Instance, QuarantinedInstance, Series, Study

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def _header(uid: str, series: str = "1.2.3.4", study: str = "1.2.3") -> InstanceHeader:
    return InstanceHeader(
        study_instance_uid=study,
        series_instance_uid=series,
        sop_instance_uid=uid,
        sop_class_uid=CT,
        transfer_syntax_uid=EXPLICIT_LE,
    )


def _spool(store: FileStore, data: bytes) -> Path:
    tmp = store.new_temp()
    tmp.write_bytes(data)
    return tmp


def test_other_content_committed_by_a_racing_association_is_quarantined(
    tmp_path: Path, database_url: str
) -> None:
    """Same UID, other bytes, the other association commits after our first look: ours is
    quarantined (not dropped as a duplicate), the first one kept."""
    catalog = Catalog(database_url)
    store = FileStore(tmp_path / "store")
    inner: list[object] = []

    def racing(point: str) -> None:
        if point == "before-commit" and not inner:
            other = _spool(store, b"the first content" * 64)
            inner.append(ingest(catalog, store, other, _header("1.2.3.4.9"), "OTHER"))

    ours = _spool(store, b"another content" * 64)
    result = ingest(catalog, store, ours, _header("1.2.3.4.9"), "ME", checkpoint=racing)
    assert inner[0].outcome is IngestOutcome.STORED  # type: ignore[attr-defined]
    assert result.outcome is IngestOutcome.QUARANTINED
    with catalog.read() as s:
        (row,) = s.scalars(select(Instance))
        (q,) = s.scalars(select(QuarantinedInstance))
        study = s.scalars(select(Study)).one()
    assert row.sha256 == hashlib.sha256(b"the first content" * 64).hexdigest()
    assert q.sha256 == hashlib.sha256(b"another content" * 64).hexdigest()
    assert study.flagged
    assert (store.root / q.file_path).is_file() and (store.root / row.file_path).is_file()
    assert sorted(store.iter_instance_files()) == sorted([row.file_path, q.file_path])
    assert list(store.tmp_dir.iterdir()) == []
    catalog.dispose()


def test_receivers_on_two_engines_racing_on_one_study_store_each_instance_once(
    tmp_path: Path, database_url: str
) -> None:
    """Two catalogs (as two hosts) x 4 threads send the same 12 instances of one new study,
    each thread all of them: one study, one series, 12 rows, 12 STORED in all."""
    hosts = [Catalog(database_url), Catalog(database_url)]
    store = FileStore(tmp_path / "store")
    payloads = {f"1.2.3.4.{i}": f"instance {i} ".encode() * 200 for i in range(12)}
    outcomes: list[IngestOutcome] = []
    errors: list[BaseException] = []
    start = threading.Barrier(8)
    lock = threading.Lock()

    def sender(catalog: Catalog, order: list[str]) -> None:
        start.wait()
        for uid in order:
            try:
                res = ingest(catalog, store, _spool(store, payloads[uid]), _header(uid), "S")
            except BaseException as exc:  # collected: the assertion below names it
                errors.append(exc)
                continue
            with lock:
                outcomes.append(res.outcome)

    uids = sorted(payloads)
    threads = [
        threading.Thread(target=sender, args=(hosts[i % 2], uids[i:] + uids[:i])) for i in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert outcomes.count(IngestOutcome.STORED) == 12
    assert outcomes.count(IngestOutcome.DUPLICATE) == 8 * 12 - 12
    with hosts[0].read() as s:
        assert s.scalar(select(func.count(Study.id))) == 1
        assert s.scalar(select(func.count(Series.id))) == 1
        study = s.scalars(select(Study)).one()
        series = s.scalars(select(Series)).one()
        rows = list(s.scalars(select(Instance)))
    assert (study.instance_count, study.received_count, series.instance_count) == (12, 12, 12)
    assert {r.sop_instance_uid for r in rows} == set(payloads)
    assert sorted(store.iter_instance_files()) == sorted(r.file_path for r in rows)
    assert list(store.tmp_dir.iterdir()) == []
    for catalog in hosts:
        catalog.dispose()


def test_a_series_claimed_by_two_studies_at_once_is_refused_for_one(
    tmp_path: Path, database_url: str
) -> None:
    """Two receivers bring the same new Series Instance UID under two studies at once:
    exactly one is stored, the other is a CONFLICT, never a series in two studies."""
    hosts = [Catalog(database_url), Catalog(database_url)]
    store = FileStore(tmp_path / "store")
    start = threading.Barrier(2)
    results: list[IngestOutcome] = []

    def sender(i: int) -> None:
        tmp = _spool(store, f"from study {i}".encode() * 100)
        start.wait()
        header = _header(f"1.2.9.{i}", series="1.2.9", study=f"1.2.{i}")
        results.append(ingest(hosts[i], store, tmp, header, "S").outcome)

    threads = [threading.Thread(target=sender, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == sorted([IngestOutcome.STORED, IngestOutcome.CONFLICT])
    with hosts[0].read() as s:
        assert s.scalar(select(func.count(Series.id))) == 1
        assert s.scalar(select(func.count(Instance.id))) == 1
    for catalog in hosts:
        catalog.dispose()


def test_an_unreachable_postgresql_is_catalog_busy_never_a_stored_outcome(
    tmp_path: Path,
) -> None:
    """The server goes away after the catalog opened: ingest raises CatalogBusyError (the
    receiver answers 0xA700) and leaves no file; once the server is back, it stores."""
    from tests.storage.pg import PostgresServer, require_postgres

    server = PostgresServer(require_postgres())
    server.start()
    try:
        url = server.create_database()
        catalog = Catalog(url, busy_deadline_s=1.0, busy_timeout_ms=1000)
        store = FileStore(tmp_path / "store")
        server.halt()
        with pytest.raises(CatalogBusyError):
            ingest(catalog, store, _spool(store, b"x" * 100), _header("1.2.3.4.1"), "S")
        assert list(store.iter_instance_files()) == []
        server.start_again()
        result = ingest(catalog, store, _spool(store, b"x" * 100), _header("1.2.3.4.1"), "S")
        assert result.outcome is IngestOutcome.STORED
        catalog.dispose()
    finally:
        server.stop()


def test_start_up_repair_of_a_shared_catalog_leaves_other_hosts_files_in_flight(
    tmp_path: Path, database_url: str
) -> None:
    """A host restarting on PostgreSQL must not delete what another host's receiver has
    just renamed into the shared store (its commit follows) or is still spooling; on
    SQLite (one host, repair before serving) every unrecorded file goes at once."""
    import os
    import time

    from storage import reconcile

    catalog = Catalog(database_url)
    store = FileStore(tmp_path / "store")
    hour_ago = time.time() - 3600

    def placed(data: bytes) -> Path:
        rel = store.commit_instance(_spool(store, data), hashlib.sha256(data).hexdigest())
        return store.root / rel

    young, old = placed(b"renamed, commit pending" * 10), placed(b"crash leftover" * 10)
    os.utime(old, (hour_ago, hour_ago))
    spooling, stale = _spool(store, b"in flight"), _spool(store, b"stale spool")
    os.utime(stale, (hour_ago, hour_ago))
    repaired = reconcile(catalog, store)
    if catalog.postgres:
        assert repaired == {"tmp": 1, "orphans": 1}
        assert young.exists() and spooling.exists()
    else:
        assert repaired == {"tmp": 2, "orphans": 2}
        assert not young.exists() and not spooling.exists()
    assert not old.exists() and not stale.exists()
    catalog.dispose()


def test_is_known_sees_a_row_committed_by_another_engine(tmp_path: Path, database_url: str) -> None:
    """The receive path's look-up (a raw pooled read on SQLite): false before another
    host commits the UID, true after, and never true for a look-alike UID."""
    reader, writer = Catalog(database_url), Catalog(database_url)
    store = FileStore(tmp_path / "store")
    assert not is_known(reader, "1.2.3.4.77")
    ingest(writer, store, _spool(store, b"x" * 256), _header("1.2.3.4.77"), "S")
    assert is_known(reader, "1.2.3.4.77")
    assert not is_known(reader, "1.2.3.4.7") and not is_known(reader, "1.2.3.4.77 ")
    for catalog in (reader, writer):
        catalog.dispose()


@pytest.mark.parametrize("grace_s", [0.0, 60.0])
def test_the_spool_sweep_skips_a_file_another_process_took(tmp_path, monkeypatch, grace_s):
    """Receivers sharing a store sweep one spool: a file listed, then renamed by another
    process (an applier's ``.part``), is no orphan and must not stop the start-up."""
    store = FileStore(tmp_path / "store")
    taken = store.tmp_dir / "apply-1.part"
    taken.write_bytes(b"x")
    orphan = store.tmp_dir / "rq-1.dcm"
    orphan.write_bytes(b"y")
    os.utime(orphan, (time.time() - 3600, time.time() - 3600))
    listed = list(os.scandir(store.tmp_dir))
    taken.unlink()
    monkeypatch.setattr(filestore.os, "scandir", lambda path: iter(listed))
    assert store.sweep_tmp(grace_s) == 1
    assert not orphan.exists()


def test_a_batch_that_loses_a_unique_race_records_nothing(
    tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch's own look-up is made blind (as if the other writer committed just after
    it): the insert hits the unique constraint, the whole batch rolls back and the
    caller is told to go one by one."""
    import datetime as dt

    from sqlalchemy import bindparam, false

    import storage.catalog as catalog_module
    from storage import PlacedInstance, RecordRaceError, ingest_placed

    catalog = Catalog(database_url)
    store = FileStore(tmp_path / "store")
    first = ingest(catalog, store, _spool(store, b"first" * 64), _header("1.2.3.4.1"), "A")
    assert first.outcome is IngestOutcome.STORED

    def placed(uid: str) -> PlacedInstance:
        return PlacedInstance(
            _header(uid), f"instances/{uid}.dcm", "0" * 64, 10, "B", dt.datetime(2026, 1, 1)
        )

    blind = select(Instance.sop_instance_uid, Instance.file_path).where(
        false(), Instance.sop_instance_uid.in_(bindparam("uids", expanding=True))
    )
    monkeypatch.setattr(catalog_module, "_STORED_OF", blind)
    with pytest.raises(RecordRaceError):
        ingest_placed(catalog, [placed("1.2.3.4.2"), placed("1.2.3.4.1")])
    with catalog.read() as s:
        assert s.scalars(select(Instance.sop_instance_uid)).all() == ["1.2.3.4.1"]
        assert s.scalars(select(Study.instance_count)).one() == 1
    monkeypatch.undo()
    # the look-up inside the transaction sees the row: that item is left to the caller
    results = ingest_placed(catalog, [placed("1.2.3.4.2"), placed("1.2.3.4.1")])
    assert [r.outcome if r else None for r in results] == [IngestOutcome.STORED, None]
    with catalog.read() as s:
        assert s.scalars(select(Study.instance_count)).one() == 2
    catalog.dispose()
