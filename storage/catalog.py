"""Catalog operations: ingest a verified file, completion bookkeeping, queries.

Ingest order, which makes every acknowledged instance durable:
temp file (already written and closed) -> sha256 -> atomic link to its content address
in the store -> fsync of the file and its folders -> catalog commit
(:meth:`storage.FileStore.commit_instance`). Only after :func:`ingest` returns may a
caller acknowledge.

The duplicate and mismatch rules hold for receivers on several hosts sharing one
PostgreSQL catalog because they rest on the unique constraints of Study, Series and
SOP Instance UIDs, not on the look-ups before the insert: a receiver that loses a race
gets an integrity error, and its record is tried again, now seeing the winner's rows
(``DUPLICATE``, ``QUARANTINED`` or ``CONFLICT`` as if it had come second). The study row
is locked (``FOR UPDATE``, PostgreSQL) while an instance is counted into it, so a study
completed on one host and an instance arriving on another are ordered.
"""

from __future__ import annotations

import datetime as dt
import enum
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import bindparam, delete, func, insert, select, update
from sqlalchemy.dialects.sqlite import dialect as sqlite_dialect
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from config.digest import sha256_file
from storage.db import Catalog
from storage.errors import NotFoundError, RecordRaceError
from storage.events import add_event
from storage.filestore import FileStore
from storage.jobs import enqueue_job
from storage.models import (
    Instance,
    QuarantinedInstance,
    Refusal,
    Series,
    Study,
    StudyState,
    utcnow,
)
from storage.records import InstanceFile, SeriesFiles, StudyFiles, StudyInfo

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class InstanceHeader:
    """The identifying attributes of one instance, already validated by the caller."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    modality: str | None = None
    series_number: int | None = None
    series_description: str | None = None
    instance_number: int | None = None
    study_date: str | None = None
    study_description: str | None = None
    lossy: bool = False


class IngestOutcome(enum.StrEnum):
    """What :func:`ingest` did with a file."""

    STORED = "STORED"
    DUPLICATE = "DUPLICATE"
    QUARANTINED = "QUARANTINED"
    CONFLICT = "CONFLICT"


@dataclass(frozen=True)
class IngestResult:
    """Outcome of one ingest, with catalog ids for logging."""

    outcome: IngestOutcome
    study_id: int | None
    instance_id: int | None = None
    detail: str = ""


@dataclass(frozen=True)
class _Known:
    """The stored instance with a given SOP Instance UID (plain columns, no ORM objects)."""

    instance_id: int
    sha256: str
    file_path: str
    series_instance_uid: str
    study_id: int
    study_instance_uid: str


# The receive path's statements, built once (each call only binds its parameters).
_EXISTING = (
    select(
        Instance.id,
        Instance.sha256,
        Instance.file_path,
        Series.series_instance_uid,
        Study.id,
        Study.study_instance_uid,
    )
    .join(Series, Instance.series_id == Series.id)
    .join(Study, Series.study_id == Study.id)
    .where(Instance.sop_instance_uid == bindparam("uid"))
)
_FIND_STUDY = (
    select(Study.id, Study.state)
    .where(Study.study_instance_uid == bindparam("uid"))
    .with_for_update()  # PostgreSQL; SQLite's write lock already serialises writers
)
_FIND_SERIES = select(Series.id, Series.study_id).where(
    Series.series_instance_uid == bindparam("uid")
)
_REOPEN_STUDY = update(Study).where(Study.id == bindparam("sid")).values(state=StudyState.RECEIVING)
_COUNT_SERIES = (
    update(Series)
    .where(Series.id == bindparam("sid"))
    .values(instance_count=Series.instance_count + bindparam("n"))
)
_COUNT_LOSSY_SERIES = (
    update(Series)
    .where(Series.id == bindparam("sid"))
    .values(instance_count=Series.instance_count + bindparam("n"), lossy=True)
)
_COUNT_STUDY = (
    update(Study)
    .where(Study.id == bindparam("sid"))
    .values(
        instance_count=Study.instance_count + bindparam("n"),
        received_count=Study.received_count + bindparam("n"),
        last_received_at=bindparam("now", type_=Study.last_received_at.type),
    )
)
_INSERT_INSTANCE = insert(Instance)
RACE_RETRIES = 3
"""Times a record that lost a unique-constraint race is tried again."""


def _existing(session: Session, sop_uid: str) -> _Known | None:
    row = session.connection().execute(_EXISTING, {"uid": sop_uid}).first()
    return None if row is None else _Known(*row)


_KNOWN = select(Instance.id).where(Instance.sop_instance_uid == bindparam("uid"))  # unique
_KNOWN_SQLITE = str(_KNOWN.compile(dialect=sqlite_dialect()))


def is_known(catalog: Catalog, sop_instance_uid: str) -> bool:
    """Whether an instance with this SOP Instance UID is in the catalog (a read only).

    It runs before every answer of the receive path. On SQLite the statement, compiled
    once, goes straight to a pooled DBAPI connection, without a session or SQLAlchemy's
    per-call statement handling (the look-up phase of ``python -m tests.bench.ingest_costs``
    fell from 0.27 to 0.07 ms per instance). On PostgreSQL, whose round trip dominates,
    and where transient errors are mapped to :class:`CatalogBusyError`, it goes through
    :meth:`Catalog.read`.
    """
    if catalog.postgres:
        with catalog.read() as session:
            return (
                session.connection().execute(_KNOWN, {"uid": sop_instance_uid}).first() is not None
            )
    connection = catalog.engine.raw_connection()
    try:
        cursor = connection.cursor()
        try:
            cursor.execute(_KNOWN_SQLITE, (sop_instance_uid,))
            return cursor.fetchone() is not None
        finally:
            cursor.close()
    finally:
        connection.close()  # back to the pool


def ingest(
    catalog: Catalog,
    store: FileStore,
    tmp_path: Path,
    header: InstanceHeader,
    calling_ae: str | None,
    *,
    checkpoint: Callable[[str], None] | None = None,
    received_at: dt.datetime | None = None,
) -> IngestResult:
    """Make a received file durable and record it.

    The temp file is consumed: renamed into the store, or deleted.

    Parameters
    ----------
    catalog, store
        The process's catalog and file store.
    tmp_path
        A closed file on the store's filesystem holding the instance as received.
    header
        Validated identifying attributes.
    calling_ae
        AE title of the sender (``None`` for imports).
    checkpoint
        Fault-injection hook called with ``"before-rename"`` and ``"before-commit"``
        (tests only; ``None`` in production).
    received_at
        When the instance was acknowledged (a journal entry's arrival); default now.

    Returns
    -------
    IngestResult
        ``STORED`` (new), ``DUPLICATE`` (byte-identical, nothing changed),
        ``QUARANTINED`` (same UID, other content, kept aside and the study flagged) or
        ``CONFLICT`` (same UID already stored under another study or series; refused).
    """
    sha = sha256_file(tmp_path)
    size = tmp_path.stat().st_size
    with catalog.read() as session:
        found = _existing(session, header.sop_instance_uid)
    if found is not None:
        return _ingest_known(catalog, store, tmp_path, header, calling_ae, sha, found)

    if checkpoint is not None:
        checkpoint("before-rename")
    rel = store.commit_instance(tmp_path, sha)
    if checkpoint is not None:
        checkpoint("before-commit")

    keep = False  # the file at ``rel`` is another row's (a race on identical bytes)
    raced: list[_Known] = []  # the row a concurrent association stored first

    def record(session: Session) -> IngestResult | None:
        nonlocal keep
        raced.clear()
        again = _existing(session, header.sop_instance_uid)
        if again is not None:  # a concurrent association stored the same UID first
            keep = again.file_path == rel
            raced.append(again)
            return None
        now = received_at or utcnow()
        conn = session.connection()  # Core statements: no ORM overhead on the hot path
        study_id = _study_for(session, header, calling_ae, now)
        series_id, owner = _series_for(session, header, study_id)
        if owner != study_id:
            return IngestResult(
                IngestOutcome.CONFLICT, study_id, None, "series belongs to another study"
            )
        conn.execute(
            _COUNT_LOSSY_SERIES if header.lossy else _COUNT_SERIES,
            {"sid": series_id, "n": 1},
        )
        conn.execute(_COUNT_STUDY, {"sid": study_id, "n": 1, "now": now})
        inserted = conn.execute(
            _INSERT_INSTANCE,
            {
                "series_id": series_id,
                "sop_instance_uid": header.sop_instance_uid,
                "sop_class_uid": header.sop_class_uid,
                "transfer_syntax_uid": header.transfer_syntax_uid,
                "instance_number": header.instance_number,
                "file_path": rel,
                "sha256": sha,
                "size_bytes": size,
                "calling_ae": calling_ae,
                "received_at": now,
            },
        )
        key = inserted.inserted_primary_key
        if key is None:  # pragma: no cover - SQLite reports the key of a one-row INSERT
            raise RuntimeError("the catalog did not report the new instance's id")
        return IngestResult(IngestOutcome.STORED, study_id, key[0])

    try:
        for attempt in range(RACE_RETRIES + 1):
            try:
                result = catalog.write(record)
                break
            except IntegrityError:
                # another receiver (host) inserted the same UID first: look again
                if attempt == RACE_RETRIES:
                    raise
                LOGGER.debug("ingest lost a unique-constraint race, retrying")
    except BaseException:
        # Not recorded: the file must not stay behind as an orphan (unless it is the
        # file of an identical instance another association has just committed).
        if not keep:
            (store.root / rel).unlink(missing_ok=True)
        raise
    if result is None:
        return _ingest_raced(catalog, store, rel, header, calling_ae, sha, raced[0], keep)
    if result.outcome is not IngestOutcome.STORED and not keep:
        (store.root / rel).unlink(missing_ok=True)
    return result


@dataclass(frozen=True)
class PlacedInstance:
    """A new instance whose file is at its content address, for :func:`ingest_placed`."""

    header: InstanceHeader
    file_path: str
    sha256: str
    size_bytes: int
    calling_ae: str | None
    received_at: dt.datetime


_STORED_OF = select(Instance.sop_instance_uid, Instance.file_path).where(
    Instance.sop_instance_uid.in_(bindparam("uids", expanding=True))
)


def stored_paths(catalog: Catalog, sop_instance_uids: Sequence[str]) -> dict[str, str]:
    """The file path of each of these SOP Instance UIDs the catalog holds (one read)."""
    if not sop_instance_uids:
        return {}
    with catalog.read() as session:
        rows = session.connection().execute(_STORED_OF, {"uids": list(sop_instance_uids)})
        return {row[0]: row[1] for row in rows}


def ingest_placed(catalog: Catalog, items: Sequence[PlacedInstance]) -> list[IngestResult | None]:
    """Record many new instances, already placed and flushed, in one transaction.

    The batch form of :func:`ingest`'s record for instances whose SOP Instance UIDs
    were new when looked up (the journal applier's common case): one commit for all,
    each study and series looked up once, their counts raised once. Items must have
    distinct SOP Instance UIDs.

    Returns
    -------
    list
        Per item, in order: ``STORED``; ``CONFLICT`` (its series belongs to another
        study: nothing recorded); or ``None`` when its UID is in the catalog by now (a
        receiver on another host stored it first: nothing recorded; take the one-by-one
        path, which finds it; :func:`stored_paths` tells whether the row found is
        the same file).

    Raises
    ------
    RecordRaceError
        When a concurrent writer inserted one of the UIDs, studies or series first:
        nothing of the batch is recorded.
    CatalogBusyError
        As :meth:`Catalog.write`.
    """
    if len({it.header.sop_instance_uid for it in items}) != len(items):
        raise ValueError("a batch must not hold one SOP Instance UID twice")

    def record(session: Session) -> list[IngestResult | None]:
        conn = session.connection()
        uids = [it.header.sop_instance_uid for it in items]
        stored = {row[0] for row in conn.execute(_STORED_OF, {"uids": uids})}
        studies: dict[str, int] = {}
        series_of: dict[str, tuple[int, int]] = {}  # series UID -> (series id, study id)
        per_series: dict[int, list[int]] = {}  # series id -> [count, lossy]
        per_study: dict[int, list[Any]] = {}  # study id -> [count, last received]
        rows: list[dict[str, Any]] = []
        out: list[IngestResult | None] = []
        for it in items:
            header = it.header
            if header.sop_instance_uid in stored:
                out.append(None)
                continue
            study_id = studies.get(header.study_instance_uid)
            if study_id is None:
                study_id = _study_for(session, header, it.calling_ae, it.received_at)
                studies[header.study_instance_uid] = study_id
            found = series_of.get(header.series_instance_uid)
            if found is None:
                found = _series_for(session, header, study_id)
                series_of[header.series_instance_uid] = found
            series_id, owner = found
            if owner != study_id:
                out.append(
                    IngestResult(
                        IngestOutcome.CONFLICT, study_id, None, "series belongs to another study"
                    )
                )
                continue
            counts = per_series.setdefault(series_id, [0, 0])
            counts[0] += 1
            counts[1] |= bool(header.lossy)
            study_counts = per_study.setdefault(study_id, [0, it.received_at])
            study_counts[0] += 1
            study_counts[1] = max(study_counts[1], it.received_at)
            rows.append(
                {
                    "series_id": series_id,
                    "sop_instance_uid": header.sop_instance_uid,
                    "sop_class_uid": header.sop_class_uid,
                    "transfer_syntax_uid": header.transfer_syntax_uid,
                    "instance_number": header.instance_number,
                    "file_path": it.file_path,
                    "sha256": it.sha256,
                    "size_bytes": it.size_bytes,
                    "calling_ae": it.calling_ae,
                    "received_at": it.received_at,
                }
            )
            out.append(IngestResult(IngestOutcome.STORED, study_id))
        for series_id, (n, lossy) in per_series.items():
            conn.execute(
                _COUNT_LOSSY_SERIES if lossy else _COUNT_SERIES, {"sid": series_id, "n": n}
            )
        for study_id, (n, last) in per_study.items():
            conn.execute(_COUNT_STUDY, {"sid": study_id, "n": n, "now": last})
        if rows:
            conn.execute(_INSERT_INSTANCE, rows)
        return out

    try:
        return catalog.write(record)
    except IntegrityError as exc:
        raise RecordRaceError("a writer elsewhere recorded part of the batch first") from exc


def _study_for(
    session: Session, header: InstanceHeader, calling_ae: str | None, now: dt.datetime
) -> int:
    """The id of the header's study, created or reopened as an arriving instance does."""
    conn = session.connection()
    found = conn.execute(_FIND_STUDY, {"uid": header.study_instance_uid}).first()
    if found is None:
        study = Study(
            study_instance_uid=header.study_instance_uid,
            state=StudyState.RECEIVING,
            study_date=header.study_date,
            study_description=header.study_description,
            received_count=0,
            instance_count=0,
            created_at=now,
            last_received_at=now,
        )
        session.add(study)
        session.flush()
        add_event(session, study.id, "created", f"first instance from {calling_ae or 'import'}")
        return study.id
    if found[1] is StudyState.COMPLETE:
        conn.execute(_REOPEN_STUDY, {"sid": found[0]})
        add_event(session, found[0], "reopened", "instance arrived after completion")
    return int(found[0])


def _series_for(session: Session, header: InstanceHeader, study_id: int) -> tuple[int, int]:
    """``(series id, its study id)`` of the header's series, created in ``study_id`` if new."""
    found = session.connection().execute(_FIND_SERIES, {"uid": header.series_instance_uid}).first()
    if found is not None:
        return int(found[0]), int(found[1])
    series = Series(
        study_id=study_id,
        series_instance_uid=header.series_instance_uid,
        modality=header.modality,
        series_number=header.series_number,
        series_description=header.series_description,
        lossy=header.lossy,
        instance_count=0,
    )
    session.add(series)
    session.flush()
    return series.id, study_id


def _ingest_raced(
    catalog: Catalog,
    store: FileStore,
    rel: str,
    header: InstanceHeader,
    calling_ae: str | None,
    sha: str,
    found: _Known,
    keep: bool,
) -> IngestResult:
    """The same UID was committed by another association after our first look.

    Identical bytes share the content address, so the file at ``rel`` is the winner's:
    a duplicate. Other content is ours alone; it goes back to the spool and through the
    rules for a known UID (quarantine, or a conflict when the series or study differ).
    """
    if keep:
        return IngestResult(IngestOutcome.DUPLICATE, found.study_id, found.instance_id, "race")
    tmp = store.new_temp()
    os.replace(store.root / rel, tmp)
    return _ingest_known(catalog, store, tmp, header, calling_ae, sha, found)


def _ingest_known(
    catalog: Catalog,
    store: FileStore,
    tmp_path: Path,
    header: InstanceHeader,
    calling_ae: str | None,
    sha: str,
    found: _Known,
) -> IngestResult:
    if (
        found.series_instance_uid != header.series_instance_uid
        or found.study_instance_uid != header.study_instance_uid
    ):
        tmp_path.unlink(missing_ok=True)
        return IngestResult(
            IngestOutcome.CONFLICT,
            found.study_id,
            found.instance_id,
            f"SOP Instance UID already stored as instance {found.instance_id} "
            "in another series or study",
        )
    if found.sha256 == sha:
        tmp_path.unlink(missing_ok=True)
        return IngestResult(IngestOutcome.DUPLICATE, found.study_id, found.instance_id)
    rel = store.quarantine(tmp_path, sha)
    reason = f"SOP Instance UID of instance {found.instance_id} re-sent with different content"

    def record(session: Session) -> IngestResult:
        st = session.get(Study, found.study_id)
        assert st is not None
        st.flagged = True
        st.flag_reason = reason
        session.add(
            QuarantinedInstance(
                study_id=st.id,
                sop_instance_uid=header.sop_instance_uid,
                file_path=rel,
                sha256=sha,
                reason=reason,
                calling_ae=calling_ae,
            )
        )
        detail = f"{reason}; sha256 {found.sha256[:12]} kept, {sha[:12]} quarantined"
        add_event(session, st.id, "quarantine", detail)
        return IngestResult(IngestOutcome.QUARANTINED, st.id, found.instance_id, reason)

    try:
        return catalog.write(record)
    except BaseException:
        (store.root / rel).unlink(missing_ok=True)
        raise


REFUSALS_KEPT = 10_000
"""The refusals table keeps the newest rows only, so a hostile flood cannot grow it."""


def record_refusal(
    catalog: Catalog,
    status: int,
    reason: str,
    calling_ae: str | None,
    sop_instance_uid: str | None,
    *,
    deadline_s: float = 2.0,
) -> None:
    """Record why an instance was refused (the caller has checked the UID is valid).

    Waits at most ``deadline_s`` for the write lock; older rows beyond
    :data:`REFUSALS_KEPT` are pruned.

    Raises
    ------
    CatalogBusyError
        When the catalog stays locked past the deadline.
    """

    def add(session: Session) -> None:
        row = Refusal(
            calling_ae=(calling_ae or None) and calling_ae[:16],
            sop_instance_uid=sop_instance_uid,
            status=int(status),
            reason=reason[:500],
        )
        session.add(row)
        session.flush()
        if row.id % 100 == 0:
            session.execute(delete(Refusal).where(Refusal.id <= row.id - REFUSALS_KEPT))

    catalog.write(add, deadline_s=deadline_s)


SHARED_GRACE_S = 900.0
"""On a PostgreSQL catalog (a store shared by several hosts), the start-up repair leaves
spool and store files younger than this: another host's receiver may be between its
rename and its commit (which takes at most its busy deadline, seconds)."""


def reconcile(
    catalog: Catalog, store: FileStore, *, grace_s: float | None = None
) -> dict[str, int]:
    """Start-up repair: sweep the spool and remove store files no row refers to.

    Files renamed into the store whose catalog commit never happened were never
    acknowledged; they are removed, and so are output folders of jobs that no longer
    exist (a purge interrupted between its catalog commit and its file deletions).

    Parameters
    ----------
    grace_s
        Leave spool and unrecorded store files younger than this. Default: none on
        SQLite (one host; the repair runs before any receiver), :data:`SHARED_GRACE_S`
        on PostgreSQL, whose receivers on other hosts keep working while one restarts.

    Returns
    -------
    dict
        ``{"tmp": n, "orphans": m}`` counts.
    """
    if grace_s is None:
        grace_s = SHARED_GRACE_S if catalog.postgres else 0.0
    swept = store.sweep_tmp(grace_s)
    with catalog.read() as session:
        known = set(session.scalars(select(Instance.file_path)))
        known |= set(session.scalars(select(QuarantinedInstance.file_path)))
    orphans = 0
    young = time.time() - grace_s
    for rel in store.iter_instance_files():
        if rel not in known:
            if grace_s and (store.root / rel).stat().st_mtime > young:
                continue  # perhaps another host's ingest between rename and commit
            os.unlink(store.root / rel)
            orphans += 1
    from storage.models import Job

    with catalog.read() as session:
        jobs = {str(i) for i in session.scalars(select(Job.id))}
    for entry in os.scandir(store.root / "outputs"):
        if entry.is_dir(follow_symlinks=False) and entry.name not in jobs:
            shutil.rmtree(entry.path)
            orphans += 1
    if orphans:
        LOGGER.warning("removed unrecorded store files count=%d", orphans)
    return {"tmp": swept, "orphans": orphans}


def study_ids(catalog: Catalog, study_instance_uids: set[str]) -> set[int]:
    """Catalog ids of the studies with these Study Instance UIDs (those it has)."""
    if not study_instance_uids:
        return set()
    with catalog.read() as session:
        found = session.scalars(
            select(Study.id).where(Study.study_instance_uid.in_(sorted(study_instance_uids)))
        )
        return {int(i) for i in found}


def receiving_studies(catalog: Catalog) -> list[tuple[int, int]]:
    """``(study id, received_count)`` of every study in RECEIVING."""
    with catalog.read() as session:
        rows = session.execute(
            select(Study.id, Study.received_count).where(Study.state == StudyState.RECEIVING)
        ).all()
    return [(int(a), int(b)) for a, b in rows]


def mark_complete(
    catalog: Catalog, study_id: int, seen_count: int, detail: str, *, enqueue: bool = True
) -> bool:
    """Move a study to COMPLETE if nothing arrived since ``seen_count`` was read.

    With ``enqueue``, a processing job is queued in the same transaction, so a crash can
    never leave a COMPLETE study without its job.

    Returns
    -------
    bool
        Whether the study changed state.
    """

    def change(session: Session) -> bool:
        # locked (PostgreSQL): an instance counted on another host waits, or is seen
        study = session.get(Study, study_id, with_for_update=True)
        if study is None or study.state is not StudyState.RECEIVING:
            return False
        if study.received_count != seen_count:
            return False
        study.state = StudyState.COMPLETE
        study.completed_at = utcnow()
        study.completion_count += 1
        add_event(session, study.id, "complete", detail)
        if enqueue:
            why = "study complete" if study.completion_count == 1 else "study re-completed"
            enqueue_job(session, study.id, why)
        return True

    return catalog.write(change)


def _study_row(session: Session, ref: str) -> Study:
    stmt = select(Study).options(selectinload(Study.series), selectinload(Study.events))
    study = None
    if ref.isdigit():
        study = session.scalar(stmt.where(Study.id == int(ref)))
    if study is None:
        study = session.scalar(stmt.where(Study.study_instance_uid == ref))
    if study is None:
        raise NotFoundError(f"no study with id or Study Instance UID {ref!r}")
    return study


def find_study(catalog: Catalog, ref: str) -> StudyInfo:
    """A study, with its series and audit trail, by catalog id or Study Instance UID.

    Raises
    ------
    NotFoundError
        When no study matches.
    """
    with catalog.read() as session:
        study = _study_row(session, ref)
        return StudyInfo.of(study, series=list(study.series), events=list(study.events))


def list_studies(catalog: Catalog, limit: int = 200) -> list[StudyInfo]:
    """Most recent studies first, with their series counts."""
    with catalog.read() as session:
        counts = dict(
            session.execute(
                select(Series.study_id, func.count(Series.id)).group_by(Series.study_id)
            ).all()
        )
        rows = session.scalars(select(Study).order_by(Study.last_received_at.desc()).limit(limit))
        return [StudyInfo.of(s, series_count=int(counts.get(s.id, 0))) for s in rows]


def study_files(catalog: Catalog, study_id: int) -> StudyFiles:
    """A study and the stored files of each series (paths relative to the store root).

    Raises
    ------
    NotFoundError
        When the study is not in the catalog (purged).
    """
    with catalog.read() as session:
        study = session.get(Study, study_id)
        if study is None:
            raise NotFoundError(f"no study with id {study_id}")
        series = list(
            session.scalars(
                select(Series)
                .options(selectinload(Series.instances))
                .where(Series.study_id == study_id)
                .order_by(Series.id)
            )
        )
        return StudyFiles(
            study=StudyInfo.of(study, series=series),
            series=tuple(
                SeriesFiles(
                    se.series_instance_uid,
                    se.series_number,
                    tuple(InstanceFile(i.sop_instance_uid, i.file_path) for i in se.instances),
                )
                for se in series
            ),
        )


def count_instances(catalog: Catalog) -> int:
    """Number of stored instances."""
    with catalog.read() as session:
        return int(session.scalar(select(func.count(Instance.id))) or 0)


def age_seconds(when: dt.datetime) -> float:
    """Seconds since a stored UTC time."""
    return max(0.0, (utcnow() - when).total_seconds())
