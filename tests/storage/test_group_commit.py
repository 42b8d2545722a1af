"""Catalog group commit and the receive path's file placement."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest
from sqlalchemy import event, func, select

from storage import Catalog, FileStore, IngestOutcome, ingest
from storage.catalog import InstanceHeader
from storage.models import Instance, Refusal


def _refusal(reason: str) -> Refusal:
    return Refusal(calling_ae="T", sop_instance_uid=None, status=0xA900, reason=reason)


def test_concurrent_writes_share_commits_and_keep_their_own_errors(database_url: str) -> None:
    catalog = Catalog(database_url)
    commits = []
    event.listen(catalog.engine, "commit", lambda conn: commits.append(1))
    start = threading.Barrier(16)
    results: dict[int, object] = {}

    def work(i: int) -> None:
        start.wait()
        for j in range(10):

            def add(session, i=i, j=j):  # type: ignore[no-untyped-def]
                session.add(_refusal(f"{i}-{j}"))
                session.flush()
                if j == 5 and i % 4 == 0:
                    raise ValueError(f"boom {i}")
                return (i, j)

            try:
                results[i * 100 + j] = catalog.write(add)
            except ValueError as exc:
                results[i * 100 + j] = exc

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with catalog.read() as session:
        reasons = set(session.scalars(select(Refusal.reason)))
    failed = {f"{i}-5" for i in range(0, 16, 4)}
    assert reasons == {f"{i}-{j}" for i in range(16) for j in range(10)} - failed
    for i in range(16):
        for j in range(10):
            got = results[i * 100 + j]
            if f"{i}-{j}" in failed:
                assert isinstance(got, ValueError) and str(got) == f"boom {i}"
            else:
                assert got == (i, j)
    # 160 writes from 16 threads at once: some of them shared a commit
    assert 0 < len(commits) < 160
    catalog.dispose()


def test_a_lone_write_that_raises_commits_nothing(database_url: str) -> None:
    catalog = Catalog(database_url)

    def add(session):  # type: ignore[no-untyped-def]
        session.add(_refusal("x"))
        session.flush()
        raise RuntimeError("no")

    with pytest.raises(RuntimeError, match="no"):
        catalog.write(add)
    with catalog.read() as session:
        assert session.scalar(select(func.count(Refusal.id))) == 0
    catalog.dispose()


def _header(uid: str) -> InstanceHeader:
    return InstanceHeader(
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.4",
        sop_instance_uid=uid,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
    )


def test_identical_instance_stored_by_a_racing_association_keeps_its_file(
    tmp_path: Path, database_url: str
) -> None:
    """Both associations rename identical bytes to the same path: the loser must not delete it."""
    catalog = Catalog(database_url)
    store = FileStore(tmp_path / "store")
    data = b"identical bytes of one instance" * 100
    first, second = store.new_temp(), store.new_temp()
    first.write_bytes(data)
    second.write_bytes(data)
    inner: list[object] = []

    def racing(point: str) -> None:
        # the other association commits the same UID after our duplicate check
        if point == "before-commit" and not inner:
            inner.append(ingest(catalog, store, second, _header("1.2.3.4.5"), "OTHER"))

    result = ingest(catalog, store, first, _header("1.2.3.4.5"), "ME", checkpoint=racing)
    assert inner[0].outcome is IngestOutcome.STORED  # type: ignore[attr-defined]
    assert result.outcome is IngestOutcome.DUPLICATE and result.detail == "race"
    with catalog.read() as session:
        rel = session.scalar(select(Instance.file_path))
    path = store.root / rel
    assert path.read_bytes() == data
    assert path.name == hashlib.sha256(data).hexdigest() + ".dcm"
    assert list(store.tmp_dir.iterdir()) == []
    catalog.dispose()


def test_placing_into_new_folders(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    for i in range(20):
        tmp = store.new_temp()
        payload = f"instance {i}".encode()
        tmp.write_bytes(payload)
        rel = store.commit_instance(tmp, hashlib.sha256(payload).hexdigest())
        assert (store.root / rel).read_bytes() == payload
        assert (store.root / rel).stat().st_mode & 0o777 == 0o640
        assert not tmp.exists()
    assert sorted(store.iter_instance_files()) == sorted(
        f"instances/{h[:2]}/{h[2:4]}/{h}.dcm"
        for h in (hashlib.sha256(f"instance {i}".encode()).hexdigest() for i in range(20))
    )


def test_placing_onto_an_existing_name_keeps_the_file_already_there(tmp_path: Path) -> None:
    """Identical bytes placed twice: the first file (perhaps committed) is never replaced."""
    store = FileStore(tmp_path / "store")
    data = b"one instance" * 50
    sha = hashlib.sha256(data).hexdigest()
    first = store.new_temp()
    first.write_bytes(data)
    rel = store.commit_instance(first, sha)
    inode = (store.root / rel).stat().st_ino
    second = store.new_temp()
    second.write_bytes(data)
    assert store.commit_instance(second, sha) == rel
    assert (store.root / rel).stat().st_ino == inode
    assert (store.root / rel).read_bytes() == data
    assert (store.root / rel).stat().st_nlink == 1  # no link left behind in the spool
    assert list(store.tmp_dir.iterdir()) == []


def _hold_writelock(catalog_path: Path) -> int:
    """Take the catalog's cross-process writer lock as another process would (a separate
    open file description: ``flock`` conflicts between those even in one process)."""
    import fcntl
    import os

    fd = os.open(f"{catalog_path}.writelock", os.O_RDWR | os.O_CREAT, 0o640)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def test_a_writer_waits_for_the_process_lock_and_runs_the_moment_it_is_released(
    tmp_path: Path,
) -> None:
    import os
    import time

    path = tmp_path / "catalog.sqlite"
    catalog = Catalog(f"sqlite:///{path}")
    fd = _hold_writelock(path)
    done: list[float] = []

    def write() -> None:
        catalog.write(lambda s: s.add(_refusal("after the lock")))
        done.append(time.monotonic())

    waiter = threading.Thread(target=write)
    waiter.start()
    time.sleep(0.5)
    assert not done, "wrote while another process held the writer lock"
    released = time.monotonic()
    os.close(fd)
    waiter.join(10)
    assert done and done[0] - released < 0.25, "not woken when the lock was released"
    with catalog.read() as session:
        assert session.scalar(select(func.count()).select_from(Refusal)) == 1
    catalog.dispose()


def test_a_writer_gives_up_at_its_deadline_and_the_lock_is_not_kept(tmp_path: Path) -> None:
    import os
    import time

    from storage import CatalogBusyError

    path = tmp_path / "catalog.sqlite"
    catalog = Catalog(f"sqlite:///{path}")
    fd = _hold_writelock(path)
    t0 = time.monotonic()
    with pytest.raises(CatalogBusyError, match="locked by another writer"):
        catalog.write(lambda s: s.add(_refusal("never")), deadline_s=0.3)
    assert 0.25 < time.monotonic() - t0 < 5
    os.close(fd)
    # the waiter that gave up released what it was granted later: the lock is free
    time.sleep(0.2)
    os.close(_hold_writelock(path))
    catalog.write(lambda s: s.add(_refusal("now")))
    with catalog.read() as session:
        assert session.scalars(select(Refusal.reason)).all() == ["now"]
    catalog.dispose()
