"""The ingest journal (``storage.acknowledge = "journal"``) and its applier, in process.

Real files through :meth:`Receiver.accept`, the same call the SCP handler makes; the
applier then catalogs them. The subprocess crash points are in
``tests/reliability/test_kill_points.py``.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import event, func, select

import dicom_node.apply as apply_module
from config import load_settings
from config.digest import sha256_file
from dicom_node.apply import Applier, replay
from dicom_node.receive import Receiver, open_journal, open_node_storage
from dicom_node.service import write_settings_file
from dicom_node.validate import DATASET_MISMATCH, SUCCESS
from storage import CatalogBusyError, RecordRaceError
from storage.catalog import mark_complete
from storage.journal import HEADER_XATTR, Journal, parse_entry
from storage.models import (
    Instance,
    QuarantinedInstance,
    Series,
    Study,
    StudyEvent,
    StudyState,
)
from tests.conftest import free_port
from tests.dicom_node.conftest import make_settings
from tests.dicom_node.proc import Server, cspine, wait_journal_empty
from tests.helpers import write_series


@pytest.fixture
def journaled(tmp_path):
    settings = make_settings(tmp_path, storage={"acknowledge": "journal"})
    catalog, store = open_node_storage(settings)
    journal = open_journal(settings, store)
    assert journal is not None
    receiver = Receiver(settings, catalog, store, environ={}, journal=journal)
    yield settings, receiver, journal
    catalog.dispose()


def _receive(receiver: Receiver, path: Path, ae: str = "SCANNER 1"):
    """What the SCP handler does: a spool file in the store's tmp folder, then accept."""
    spool = receiver.store.new_temp()
    shutil.copyfile(path, spool)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return receiver.accept(
        spool,
        affected_sop_instance_uid=ds.SOPInstanceUID,
        affected_sop_class_uid=ds.SOPClassUID,
        calling_ae=ae,
    )


def _rows(receiver: Receiver) -> dict[str, Instance]:
    with receiver.catalog.read() as s:
        return {r.sop_instance_uid: r for r in s.scalars(select(Instance))}


def test_entry_names_keep_arrival_order_and_any_ae_title(tmp_path):
    journal = Journal(tmp_path)
    spools = []
    for i in range(3):
        spool = tmp_path / f"s{i}"
        spool.write_bytes(b"x")
        spools.append(spool)
    titles = ["A/B \\C", "SCU", "ÅE"]  # a slash, a space, a non-ASCII character
    for spool, ae in zip(spools, titles, strict=True):
        journal.append(spool, ae)
    pending = journal.pending()
    assert [e.calling_ae for e in pending] == ["A/B \\C", "SCU", "?E"]
    assert [e.received_ns for e in pending] == sorted(e.received_ns for e in pending)
    assert journal.count() == 3 and not any(s.exists() for s in spools)
    with pytest.raises(ValueError, match=r"<ns>-<pid>-<seq>-<ae>\.dcm"):
        parse_entry(tmp_path / "journal" / "nonsense.dcm")


@pytest.mark.parametrize("flush", ["file", "filesystem"])
def test_an_append_flushes_data_and_name_before_it_returns(tmp_path, monkeypatch, flush):
    """``file``: fdatasync of the entry then fsync of the journal folder; ``filesystem``:
    one syncfs(2) of the store's filesystem after the rename (the real call runs)."""
    from storage import journal as journal_module

    calls: list[str] = []
    real_syncfs, real_fsync_dir, real_fdatasync = (
        journal_module.syncfs,
        journal_module.fsync_dir,
        os.fdatasync,
    )

    def record(name, fn):
        def call(arg):
            entries = list((tmp_path / "journal").glob("*.dcm"))
            calls.append(f"{name}:{len(entries)}")  # entries renamed in so far
            return fn(arg)

        return call

    monkeypatch.setattr(journal_module, "syncfs", record("syncfs", real_syncfs))
    monkeypatch.setattr(journal_module, "fsync_dir", record("fsync_dir", real_fsync_dir))
    monkeypatch.setattr(os, "fdatasync", record("fdatasync", real_fdatasync))
    journal = Journal(tmp_path, flush=flush)
    spool = tmp_path / "s"
    spool.write_bytes(b"x" * 1000)
    entry = journal.append(spool, "SCU")
    assert entry.read_bytes() == b"x" * 1000
    assert calls == (["fdatasync:0", "fsync_dir:1"] if flush == "file" else ["syncfs:1"])
    with pytest.raises(ValueError, match="'file' or 'filesystem'"):
        Journal(tmp_path, flush="none")


def test_shares_split_the_entries_between_appliers(tmp_path):
    journal = Journal(tmp_path)
    for i in range(40):
        spool = tmp_path / f"s{i}"
        spool.write_bytes(b"x")
        journal.append(spool, "SCU")
    every = {e.path for e in journal.pending()}
    shares = [{e.path for e in journal.pending(share=(i, 3))} for i in range(3)]
    assert set().union(*shares) == every and sum(map(len, shares)) == len(every) == 40
    assert all(shares)  # 40 entries: each of three shares gets some
    with (
        journal.applying(share=(0, 3)) as first,
        journal.applying(wait=False, share=(1, 3)) as other,
    ):
        assert first and other  # shares do not wait for each other


def test_an_entry_applied_by_another_applier_is_gone_not_an_error(tmp_path, journaled):
    settings, receiver, journal = journaled
    path = write_series(tmp_path / "series", 1)[0]
    assert _receive(receiver, path).status == SUCCESS
    (entry,) = journal.pending()
    applier = Applier(settings, receiver.catalog, receiver.store, journal, environ={})
    assert applier.apply(entry) == "stored"
    assert applier.apply(entry) == "gone"  # the same entry, listed before the other applied it


def test_one_applier_at_a_time(tmp_path):
    journal = Journal(tmp_path)
    with journal.applying() as first:
        assert first
        with journal.applying(wait=False) as second:
            assert not second
    with journal.applying(wait=False) as again:
        assert again


def test_answered_from_the_journal_then_cataloged_behind_the_answer(tmp_path, journaled):
    settings, receiver, journal = journaled
    paths = write_series(tmp_path / "series", 4, rows=32, cols=32)
    outcomes = [_receive(receiver, p) for p in paths]
    assert [(o.status, o.reason) for o in outcomes] == [(SUCCESS, "journaled")] * 4
    assert journal.count() == 4 and _rows(receiver) == {}  # answered, not yet cataloged

    applier = Applier(settings, receiver.catalog, receiver.store, journal, environ={})
    assert applier.apply_pending() == {"stored": 4}
    rows = _rows(receiver)
    sent = {pydicom.dcmread(p).SOPInstanceUID: sha256_file(p) for p in paths}
    assert {uid: r.sha256 for uid, r in rows.items()} == sent
    assert {r.calling_ae for r in rows.values()} == {"SCANNER 1"}
    for row in rows.values():
        assert sha256_file(receiver.store.root / row.file_path) == row.sha256
    assert journal.count() == 0 and list(receiver.store.tmp_dir.iterdir()) == []
    with receiver.catalog.read() as s:
        study = s.scalars(select(Study)).one()
        assert (study.received_count, study.instance_count) == (4, 4)

    # a known UID is decided in line, with the statuses of the catalog mode
    again = _receive(receiver, paths[0])
    assert (again.status, again.reason) == (SUCCESS, "DUPLICATE") and journal.count() == 0
    moved = pydicom.dcmread(paths[0])
    moved.SeriesInstanceUID = generate_uid()
    moved_path = tmp_path / "moved.dcm"
    moved.save_as(moved_path, enforce_file_format=True)
    assert _receive(receiver, moved_path).status == DATASET_MISMATCH


def test_a_conflict_found_behind_the_answer_is_set_aside_not_deleted(tmp_path, journaled, caplog):
    settings, receiver, journal = journaled
    first = write_series(tmp_path / "a", 1)[0]
    other = pydicom.dcmread(first)
    other.SeriesInstanceUID = generate_uid()  # same SOP Instance UID, another series
    second = tmp_path / "other.dcm"
    other.save_as(second, enforce_file_format=True)
    # both in flight before either is applied: both answered 0x0000
    assert _receive(receiver, first).status == SUCCESS
    assert _receive(receiver, second).status == SUCCESS
    applier = Applier(settings, receiver.catalog, receiver.store, journal, environ={})
    with caplog.at_level(logging.ERROR, logger="dicom_node.apply"):
        assert applier.apply_pending() == {"stored": 1, "bad": 1}
    assert len(_rows(receiver)) == 1 and journal.count() == 0
    kept = list(journal.bad_dir.iterdir())
    assert len(kept) == 1 and sha256_file(kept[0]) == sha256_file(second)
    assert "journal entry set aside" in caplog.text and "another series or study" in caplog.text
    assert str(other.PatientName) and str(other.PatientName) not in caplog.text
    assert other.SOPInstanceUID not in caplog.text  # the entry's name carries no UID


def test_a_torn_entry_is_set_aside_and_the_replay_goes_on(tmp_path, journaled):
    settings, receiver, journal = journaled
    paths = write_series(tmp_path / "series", 3)
    for p in paths:
        assert _receive(receiver, p).status == SUCCESS
    torn = journal.pending()[1].path
    data = torn.read_bytes()
    torn.write_bytes(data[: len(data) // 3])  # as if power failed mid-write, fsync off
    assert replay(settings, receiver.catalog, receiver.store, journal) == 3
    assert len(_rows(receiver)) == 2 and journal.count() == 0 and journal.bad_count() == 1


def test_the_applier_uses_the_receivers_header_and_parses_without_it(
    tmp_path, journaled, monkeypatch
):

    settings, receiver, journal = journaled
    paths = write_series(tmp_path / "series", 2)
    for p in paths:
        assert _receive(receiver, p).status == SUCCESS
    first, second = journal.pending()
    assert journal.header(first) is not None
    os.removexattr(second.path, HEADER_XATTR)  # a filesystem without extended attributes
    assert journal.header(second) is None
    parsed = []
    original = apply_module.inspect_file
    monkeypatch.setattr(
        apply_module, "inspect_file", lambda *a, **k: parsed.append(1) or original(*a, **k)
    )
    applier = Applier(settings, receiver.catalog, receiver.store, journal, environ={})
    assert applier.apply_pending() == {"stored": 2}
    assert len(parsed) == 1  # only the entry without the kept header was parsed
    rows = _rows(receiver)
    sent = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in paths}
    for uid, row in rows.items():
        assert row.instance_number == int(sent[uid].InstanceNumber)
        assert row.sop_class_uid == sent[uid].SOPClassUID


def test_imports_and_the_catalog_mode_never_use_the_journal(tmp_path):
    settings = make_settings(tmp_path, storage={"acknowledge": "catalog"})
    catalog, store = open_node_storage(settings)
    try:
        assert open_journal(settings, store) is None
    finally:
        catalog.dispose()
    settings = make_settings(tmp_path, storage={"acknowledge": "journal"})
    catalog, store = open_node_storage(settings)
    journal = open_journal(settings, store)
    try:
        receiver = Receiver(settings, catalog, store, environ={}, journal=journal)
        path = write_series(tmp_path / "imp", 1)[0]
        outcome = receiver.accept(path, consume=False)  # cspine import: no calling AE
        assert (outcome.status, outcome.reason) == (SUCCESS, "STORED")
        assert journal is not None and journal.count() == 0
    finally:
        catalog.dispose()


@pytest.mark.parametrize("point", ["apply-before-commit", "apply-before-drop"])
def test_sigkill_while_applying_then_replay_loses_nothing(tmp_path, journaled, point):
    settings, receiver, journal = journaled
    paths = write_series(tmp_path / "series", 5)
    for p in paths:
        assert _receive(receiver, p).status == SUCCESS
    # batches of 2: [1, 2] [3, 4] [5]; the kill comes at the third entry, in the second
    settings = make_settings(tmp_path, storage={"acknowledge": "journal", "apply_batch": 2})
    settings_file = write_settings_file(settings)
    cmd = [sys.executable, "-m", "dicom_node.apply", "--settings-file", str(settings_file)]
    killed = subprocess.run(
        [*cmd, "--once"],
        env={**_env(), "CSPINE_FAULT_KILL_AT": f"{point}:3"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert killed.returncode == -9, killed.stderr
    assert f"fault injection: SIGKILL at {point} (instance 3)" in killed.stderr
    # before the commit: the first batch only; before the drop: the second batch too
    committed = 2 if point == "apply-before-commit" else 4
    assert len(_rows(receiver)) == committed and journal.count() == 3
    # the applier of the next start applies the rest; the third and fourth entries are
    # duplicates (committed) or placed again over their orphans (not committed)
    again = subprocess.run(
        [*cmd, "--once"], env=_env(), capture_output=True, text=True, timeout=120
    )
    assert again.returncode == 0, again.stderr
    rows = _rows(receiver)
    assert len(rows) == 5 and journal.count() == 0
    assert set(receiver.store.iter_instance_files()) == {r.file_path for r in rows.values()}
    for row in rows.values():
        assert sha256_file(receiver.store.root / row.file_path) == row.sha256
    assert "Traceback" not in again.stderr


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "CSPINE_FAULT_KILL_AT"}


@pytest.mark.parametrize("appliers", [1, 2])
def test_serve_answers_from_the_journal_and_a_clean_stop_leaves_it_empty(tmp_path, appliers):
    """The defaults of ``cspine serve`` (and two appliers, at another niceness): applier
    processes beside the receiver; dcmtk sends; SIGTERM drains what is left; ``cspine
    status`` shows it."""
    paths = write_series(tmp_path / "series", 20, rows=64, cols=64)
    data_dir = tmp_path / "var"
    port = free_port()
    env = {"CSPINE_STORAGE__APPLIERS": str(appliers)}
    if appliers == 2:
        env["CSPINE_STORAGE__APPLIER_NICE"] = "7"
    server = Server(data_dir, port, "--no-worker", "--stable-seconds", "600", env=env).start()
    try:
        sent = subprocess.run(
            ["storescu", "-aec", "CSPINE", "-xs", "127.0.0.1", str(port), *map(str, paths)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "TCP_NODELAY": "1"},
        )
        assert sent.returncode == 0, sent.stderr
        wait_journal_empty(data_dir)  # the appliers are at work: their niceness is set
        pids = [int(p) for p in re.findall(r"applier(?: \d+)? started pid=(\d+)", server.log())]
        assert len(pids) == appliers
        added = 19 if appliers == 1 else 7  # the default, then the setting
        for pid in pids:
            nice = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])
            assert nice == min(19, os.nice(0) + added)
    finally:
        server.stop()
    assert server.proc is not None and server.proc.returncode == 0
    log = server.log()
    names = ["applier"] if appliers == 1 else [f"applier {i + 1}" for i in range(appliers)]
    assert all(f"{name} started" in log for name in names) and "Traceback" not in log
    settings = load_settings(overrides={"storage": {"data_dir": str(data_dir)}}, environ={})
    catalog, store = open_node_storage(settings)
    try:
        with catalog.read() as s:
            assert s.scalar(select(func.count(Instance.id))) == len(paths)
        assert Journal(store.root).count() == 0
    finally:
        catalog.dispose()
    status = cspine("status", "--data-dir", str(data_dir))
    assert status.returncode == 0, status.stderr
    assert "ingest journal: 0 answered, not yet cataloged; 0 set aside" in status.stdout


def test_a_study_with_answered_uncataloged_instances_is_not_complete(tmp_path, journaled):
    from dicom_node.completion import CompletionChecker

    settings, receiver, journal = journaled
    paths = write_series(tmp_path / "series", 2)
    assert _receive(receiver, paths[0]).status == SUCCESS
    applier = Applier(settings, receiver.catalog, receiver.store, journal, environ={})
    applier.apply_pending()
    assert _receive(receiver, paths[1]).status == SUCCESS  # waits in the journal
    study_uid = pydicom.dcmread(paths[0]).StudyInstanceUID
    assert journal.waiting_studies() == {study_uid}
    clock = [0.0]
    checker = CompletionChecker(
        receiver.catalog, 10, clock=lambda: clock[0], waiting_studies=journal.waiting_studies
    )
    assert checker.tick() == []  # first sight of the study
    clock[0] = 60.0  # long past the stable window, but an answered instance waits
    assert checker.tick() == []
    applier.apply_pending()  # cataloged now: its stable window starts here
    assert journal.waiting_studies() == set()
    assert checker.tick() == []
    clock[0] = 65.0
    assert checker.tick() == []
    clock[0] = 71.0
    (study_id,) = checker.tick()
    assert study_id
    # an entry without the kept header (no extended attributes): every study waits
    path = write_series(tmp_path / "other", 1)[0]
    assert _receive(receiver, path).status == SUCCESS
    (entry,) = journal.pending()
    os.removexattr(entry.path, HEADER_XATTR)
    assert journal.waiting_studies() is None


def _altered(path: Path, out: Path) -> Path:
    """The same instance (same UIDs) with other pixel bytes: a re-send with new content."""
    ds = pydicom.dcmread(path)
    pixels = bytearray(ds.PixelData)
    pixels[0] ^= 0xFF
    ds.PixelData = bytes(pixels)
    ds.save_as(out, enforce_file_format=True)
    return out


def test_a_batch_of_new_instances_is_one_commit(tmp_path, journaled):
    settings, receiver, journal = journaled
    paths = write_series(tmp_path / "a", 5) + write_series(tmp_path / "b", 3)
    for p in paths:
        assert _receive(receiver, p).status == SUCCESS
    newest = max(e.received_ns for e in journal.pending())
    commits: list[int] = []
    event.listen(receiver.catalog.engine, "commit", lambda _conn: commits.append(1))
    applier = Applier(settings, receiver.catalog, receiver.store, journal, environ={})
    assert applier.apply_pending() == {"stored": 8}
    assert len(commits) == 1 and journal.count() == 0
    with receiver.catalog.read() as s:
        studies = s.scalars(select(Study).order_by(Study.id)).all()
        assert [(st.instance_count, st.received_count) for st in studies] == [(5, 5), (3, 3)]
        assert [se.instance_count for se in s.scalars(select(Series).order_by(Series.id))] == [5, 3]
        created = s.scalars(select(StudyEvent.kind).where(StudyEvent.kind == "created")).all()
        assert len(created) == 2
        last = studies[1].last_received_at.replace(tzinfo=dt.UTC)  # naive UTC
        assert last.timestamp() == pytest.approx(newest / 1e9, abs=1e-5)
    rows = _rows(receiver)
    assert set(receiver.store.iter_instance_files()) == {r.file_path for r in rows.values()}
    for row in rows.values():
        assert sha256_file(receiver.store.root / row.file_path) == row.sha256


def test_a_batch_decides_resends_in_the_order_they_arrived(tmp_path, journaled):
    """New, new, the first again (same bytes), new, the second again with other bytes:
    all answered before any is applied, then applied in one pass."""
    settings, receiver, journal = journaled
    a, b, c = write_series(tmp_path / "s", 3)
    b_other = _altered(b, tmp_path / "b_other.dcm")
    for p in (a, b, a, c, b_other):
        assert _receive(receiver, p).status == SUCCESS
    applier = Applier(settings, receiver.catalog, receiver.store, journal, environ={})
    assert applier.apply_batch(journal.pending()) == [
        "stored",
        "stored",
        "duplicate",
        "stored",
        "quarantined",
    ]
    rows = _rows(receiver)
    b_uid = pydicom.dcmread(b).SOPInstanceUID
    assert len(rows) == 3 and rows[b_uid].sha256 == sha256_file(b)  # the first one kept
    with receiver.catalog.read() as s:
        (kept,) = s.scalars(select(QuarantinedInstance)).all()
        assert kept.sha256 == sha256_file(b_other)
        assert s.scalars(select(Study)).one().flagged
    files = set(receiver.store.iter_instance_files())
    assert files == {r.file_path for r in rows.values()} | {kept.file_path}
    assert journal.count() == 0


def test_a_batch_reopens_a_complete_study(tmp_path, journaled):
    settings, receiver, journal = journaled
    study_uid = generate_uid()
    first = write_series(tmp_path / "a", 2, study_uid=study_uid)
    later = write_series(tmp_path / "b", 3, study_uid=study_uid)
    applier = Applier(settings, receiver.catalog, receiver.store, journal, environ={})
    for p in first:
        _receive(receiver, p)
    applier.apply_pending()
    with receiver.catalog.read() as s:
        study_id = s.scalars(select(Study.id)).one()
    assert mark_complete(receiver.catalog, study_id, 2, "test", enqueue=False)
    for p in later:
        _receive(receiver, p)
    assert applier.apply_pending() == {"stored": 3}
    with receiver.catalog.read() as s:
        study = s.get(Study, study_id)
        assert study is not None and study.state is StudyState.RECEIVING
        assert (study.instance_count, study.received_count) == (5, 5)
        kinds = s.scalars(select(StudyEvent.kind).where(StudyEvent.study_id == study_id)).all()
        assert kinds.count("reopened") == 1


def test_a_batch_that_cannot_commit_leaves_no_file_and_every_entry(
    tmp_path, journaled, monkeypatch
):
    settings, receiver, journal = journaled
    paths = write_series(tmp_path / "s", 4)
    for p in paths:
        _receive(receiver, p)

    def busy(*_a, **_k):
        raise CatalogBusyError("catalog locked by another writer for more than 30 s")

    monkeypatch.setattr(apply_module, "ingest_placed", busy)
    applier = Applier(settings, receiver.catalog, receiver.store, journal, environ={})
    with pytest.raises(CatalogBusyError):
        applier.apply_pending()
    assert journal.count() == 4 and receiver.store.iter_instance_files() == []
    monkeypatch.undo()
    assert applier.apply_pending() == {"stored": 4}
    assert journal.count() == 0 and len(receiver.store.iter_instance_files()) == 4


def test_a_batch_that_lost_a_race_goes_one_by_one(tmp_path, journaled, monkeypatch):
    """Another host inserted a UID between the look-up and the commit: an integrity
    error rolls the batch back, and each entry is applied alone (seeing the rows)."""
    settings, receiver, journal = journaled
    paths = write_series(tmp_path / "s", 3)
    for p in paths:
        _receive(receiver, p)
    calls = []

    def raced(*_a, **_k):
        calls.append(1)
        raise RecordRaceError("a writer elsewhere recorded part of the batch first")

    monkeypatch.setattr(apply_module, "ingest_placed", raced)
    applier = Applier(settings, receiver.catalog, receiver.store, journal, environ={})
    assert applier.apply_pending() == {"stored": 3} and calls == [1]
    rows = _rows(receiver)
    assert len(rows) == 3 and journal.count() == 0
    assert set(receiver.store.iter_instance_files()) == {r.file_path for r in rows.values()}


@pytest.mark.parametrize("same_bytes", [True, False])
def test_a_uid_stored_after_the_look_up_is_decided_alone(
    tmp_path, journaled, monkeypatch, same_bytes
):
    """The look-up missed a UID another writer stored meanwhile (here: the look-up is
    made to miss): the batch records the others, and that entry goes one by one."""

    settings, receiver, journal = journaled
    first, second = write_series(tmp_path / "s", 2)
    applier = Applier(settings, receiver.catalog, receiver.store, journal, environ={})
    again = first if same_bytes else _altered(first, tmp_path / "other.dcm")
    for p in (first, again, second):  # all journaled: the receiver knows none of them
        assert _receive(receiver, p).status == SUCCESS
    assert applier.apply(journal.pending()[0]) == "stored"  # the other writer's
    real = apply_module.stored_paths
    looks = []

    def missing_once(catalog, uids):
        looks.append(list(uids))
        return {} if len(looks) == 1 else real(catalog, uids)

    monkeypatch.setattr(apply_module, "stored_paths", missing_once)
    outcome = "duplicate" if same_bytes else "quarantined"
    assert applier.apply_pending() == {outcome: 1, "stored": 1}
    rows = _rows(receiver)
    assert len(rows) == 2 and journal.count() == 0
    assert rows[pydicom.dcmread(first).SOPInstanceUID].sha256 == sha256_file(first)
    with receiver.catalog.read() as s:
        kept = {q.file_path for q in s.scalars(select(QuarantinedInstance))}
    assert (
        set(receiver.store.iter_instance_files()) == {r.file_path for r in rows.values()} | kept
    )  # no orphan left by the batch's link


def test_the_applier_waits_for_a_pause_in_arrivals_or_its_delay(tmp_path, journaled):
    """Answers go first during a burst: the applier applies after a 50 ms pause in
    arrivals, or once its oldest entry waited ``storage.apply_delay_seconds``."""
    settings, receiver, journal = journaled
    assert settings.storage.apply_delay_seconds == 2.0  # the default
    applier = Applier(settings, receiver.catalog, receiver.store, journal, environ={})
    assert not applier.due()  # nothing waits
    paths = write_series(tmp_path / "s", 3)
    for p in paths:
        assert _receive(receiver, p).status == SUCCESS
    oldest, newest = journal.arrivals() or (0, 0)
    assert oldest < newest
    ms = 1_000_000
    assert not applier.due(now_ns=newest + 10 * ms)  # still arriving
    assert applier.due(now_ns=newest + 60 * ms)  # a pause
    assert applier.due(now_ns=oldest + 2001 * ms)  # a steady stream: the delay is up
    assert applier.due(now_ns=oldest - 3000 * ms)  # names ahead of this clock: no hold
    shares = [journal.arrivals(share=(i, 2)) for i in range(2)]
    spans = [s for s in shares if s is not None]
    assert min(s[0] for s in spans) == oldest and max(s[1] for s in spans) == newest
    at_once = make_settings(tmp_path, storage={"acknowledge": "journal", "apply_delay_seconds": 0})
    eager = Applier(at_once, receiver.catalog, receiver.store, journal, environ={})
    assert eager.due(now_ns=newest)
    assert applier.apply_pending() == {"stored": 3} and not applier.due()


def test_a_running_applier_holds_back_while_instances_arrive(tmp_path, journaled, monkeypatch):

    monkeypatch.setattr(apply_module, "QUIET_S", 0.5)  # a wide margin for a busy machine
    settings, receiver, journal = journaled
    paths = write_series(tmp_path / "s", 40)
    applier = Applier(settings, receiver.catalog, receiver.store, journal, environ={})
    stop = threading.Event()
    worker = threading.Thread(target=applier.run, args=(stop,))
    worker.start()
    try:
        for p in paths:  # about 1 s of arrivals, well within the 2 s delay
            assert _receive(receiver, p).status == SUCCESS
            time.sleep(0.02)
        assert _rows(receiver) == {}  # nothing applied while they kept coming
        last = time.monotonic()
        while journal.count() and time.monotonic() < last + 10:
            time.sleep(0.01)
        assert len(_rows(receiver)) == 40 and time.monotonic() - last >= 0.4
    finally:
        stop.set()
        worker.join(10)


def test_a_failing_look_at_the_journal_is_retried_not_fatal(tmp_path, journaled, monkeypatch):
    """An error while looking at the journal (a store on a network filesystem that went
    away for a moment) is logged and retried; the applier process does not die."""
    settings, receiver, journal = journaled
    for p in write_series(tmp_path / "s", 2):
        assert _receive(receiver, p).status == SUCCESS
    monkeypatch.setattr(apply_module, "RETRY_S", 0.05)
    real, fails = journal.arrivals, []

    def flaky(**kwargs):
        if not fails:
            fails.append(1)
            raise OSError(5, "Input/output error")
        return real(**kwargs)

    monkeypatch.setattr(journal, "arrivals", flaky)
    applier = Applier(settings, receiver.catalog, receiver.store, journal, environ={})
    stop = threading.Event()
    worker = threading.Thread(target=applier.run, args=(stop,))
    worker.start()
    try:
        deadline = time.monotonic() + 10
        while journal.count() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert fails == [1] and journal.count() == 0 and len(_rows(receiver)) == 2
        assert worker.is_alive()
    finally:
        stop.set()
        worker.join(10)
