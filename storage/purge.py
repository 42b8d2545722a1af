"""Retention: remove studies that are older than a cutoff and that the node no longer needs.

A study is purgeable when its last instance arrived before the cutoff, it has no job
QUEUED or RUNNING, and no delivery of its results is PENDING. Purging happens in
two steps, in this order:

1. every catalog row of the study (outbox items, outputs, job events, jobs, study
   events, quarantine, instances, series, the study) is deleted in one transaction,
   in which the conditions above are checked again;
2. then its files (instances, quarantined instances, outputs) are unlinked, each only
   if no catalog row refers to its path any more.

A crash between the two steps leaves only files that no row refers to. The start-up
repair (:func:`storage.catalog.reconcile`) removes such files under ``instances/`` and
``quarantine/``; output files under ``outputs/`` are not swept by it, and a later
purge cannot see them either (their rows are gone), so they stay until removed by hand.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import re
from dataclasses import dataclass, field

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from storage.db import Catalog
from storage.filestore import FileStore
from storage.models import (
    Instance,
    Job,
    JobEvent,
    JobState,
    OutboxItem,
    OutboxState,
    Output,
    QuarantinedInstance,
    Series,
    Study,
    StudyEvent,
    utcnow,
)

LOGGER = logging.getLogger(__name__)

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
BUSY_JOB_STATES = (JobState.QUEUED, JobState.RUNNING)


def parse_duration(text: str) -> dt.timedelta:
    """Parse a duration such as ``30d``, ``12h``, ``90m``, ``45s`` or ``2w``.

    Raises
    ------
    ValueError
        When the text is not a positive number followed by one of s, m, h, d, w.
    """
    match = _DURATION_RE.match(text or "")
    if not match:
        raise ValueError(
            f"duration {text!r} must be a number followed by s, m, h, d or w (e.g. 30d, 12h)"
        )
    seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds <= 0:
        raise ValueError(f"duration {text!r} must be longer than zero")
    return dt.timedelta(seconds=seconds)


@dataclass(frozen=True)
class PurgeCandidate:
    """One study that is (or would be) purged, with the files it owns."""

    study_id: int
    study_instance_uid: str
    last_received_at: dt.datetime
    instances: int
    outputs: int
    files: tuple[str, ...]


@dataclass
class PurgeReport:
    """What :func:`purge` did (or, with ``dry_run``, would do)."""

    cutoff: dt.datetime
    dry_run: bool
    studies: list[PurgeCandidate] = field(default_factory=list)
    skipped: list[tuple[int, str]] = field(default_factory=list)
    files_removed: int = 0
    bytes_freed: int = 0
    files_kept: int = 0


def _busy_reason(session: Session, study_id: int) -> str | None:
    job = session.scalars(
        select(Job).where(Job.study_id == study_id, Job.state.in_(BUSY_JOB_STATES)).limit(1)
    ).first()
    if job is not None:
        return f"job {job.id} is {job.state.value}"
    pending = session.scalars(
        select(OutboxItem.id)
        .join(Output, OutboxItem.output_id == Output.id)
        .join(Job, Output.job_id == Job.id)
        .where(Job.study_id == study_id, OutboxItem.state == OutboxState.PENDING)
        .limit(1)
    ).first()
    if pending is not None:
        return "a delivery is PENDING"
    return None


def _describe(session: Session, study: Study) -> PurgeCandidate:
    series_ids = select(Series.id).where(Series.study_id == study.id)
    job_ids = select(Job.id).where(Job.study_id == study.id)
    instance_files = session.scalars(
        select(Instance.file_path).where(Instance.series_id.in_(series_ids))
    ).all()
    quarantine_files = session.scalars(
        select(QuarantinedInstance.file_path).where(QuarantinedInstance.study_id == study.id)
    ).all()
    output_files = session.scalars(select(Output.file_path).where(Output.job_id.in_(job_ids))).all()
    files = tuple(dict.fromkeys([*instance_files, *quarantine_files, *output_files]))
    return PurgeCandidate(
        study_id=study.id,
        study_instance_uid=study.study_instance_uid,
        last_received_at=study.last_received_at,
        instances=len(instance_files),
        outputs=len(output_files),
        files=files,
    )


def _old_studies(session: Session, cutoff: dt.datetime, *, lock: bool = False) -> list[Study]:
    stmt = select(Study).where(Study.last_received_at < cutoff).order_by(Study.last_received_at)
    if lock:
        # PostgreSQL: a receiver counting an instance into the study, a completion or a
        # re-send waits for the purge, or the purge for it (and then sees the study as
        # it left it: no longer old, or busy). SQLite: BEGIN IMMEDIATE does this.
        stmt = stmt.with_for_update()
    return list(session.scalars(stmt))


def _delete_rows(session: Session, study_id: int) -> None:
    """Delete every row of one study, children first (foreign keys are enforced)."""
    job_ids = select(Job.id).where(Job.study_id == study_id)
    output_ids = select(Output.id).where(Output.job_id.in_(job_ids))
    series_ids = select(Series.id).where(Series.study_id == study_id)
    session.execute(delete(OutboxItem).where(OutboxItem.output_id.in_(output_ids)))
    session.execute(delete(Output).where(Output.job_id.in_(job_ids)))
    session.execute(delete(JobEvent).where(JobEvent.job_id.in_(job_ids)))
    session.execute(delete(Job).where(Job.study_id == study_id))
    session.execute(delete(StudyEvent).where(StudyEvent.study_id == study_id))
    session.execute(delete(QuarantinedInstance).where(QuarantinedInstance.study_id == study_id))
    session.execute(delete(Instance).where(Instance.series_id.in_(series_ids)))
    session.execute(delete(Series).where(Series.study_id == study_id))
    session.execute(delete(Study).where(Study.id == study_id))


def _referenced(session: Session, paths: list[str]) -> set[str]:
    found: set[str] = set()
    for model in (Instance, QuarantinedInstance, Output):
        found |= set(session.scalars(select(model.file_path).where(model.file_path.in_(paths))))
    return found


def purge(
    catalog: Catalog,
    store: FileStore,
    older_than: dt.timedelta,
    *,
    dry_run: bool = False,
    now: dt.datetime | None = None,
) -> PurgeReport:
    """Remove studies whose last instance arrived more than ``older_than`` ago.

    Parameters
    ----------
    catalog, store
        The node's catalog and file store.
    older_than
        Retention period; studies with ``last_received_at`` before ``now - older_than``
        are candidates.
    dry_run
        Only report what would be removed; change nothing.
    now
        Current UTC time (naive, like the catalog); tests pass a fixed one.

    Returns
    -------
    PurgeReport
        Purged (or purgeable) studies, studies skipped because they are busy, and the
        number of files and bytes removed.
    """
    cutoff = (now or utcnow()) - older_than
    report = PurgeReport(cutoff=cutoff, dry_run=dry_run)

    if dry_run:
        with catalog.read() as session:
            for study in _old_studies(session, cutoff):
                reason = _busy_reason(session, study.id)
                if reason is not None:
                    report.skipped.append((study.id, reason))
                else:
                    report.studies.append(_describe(session, study))
        for cand in report.studies:
            for rel in cand.files:
                with contextlib.suppress(OSError, ValueError):
                    report.bytes_freed += store.abspath(rel).stat().st_size
        return report

    def remove_rows(session: Session) -> tuple[list[PurgeCandidate], list[tuple[int, str]]]:
        # Conditions are checked again inside the write transaction, the studies locked
        # (BEGIN IMMEDIATE on SQLite, FOR UPDATE on PostgreSQL): no instance, job or
        # delivery can be added to these studies meanwhile.
        done: list[PurgeCandidate] = []
        skipped: list[tuple[int, str]] = []
        for study in _old_studies(session, cutoff, lock=True):
            reason = _busy_reason(session, study.id)
            if reason is not None:
                skipped.append((study.id, reason))
                continue
            done.append(_describe(session, study))
            _delete_rows(session, study.id)
        return done, skipped

    report.studies, report.skipped = catalog.write(remove_rows)
    for cand in report.studies:
        LOGGER.info(
            "study purged study_id=%d instances=%d outputs=%d",
            cand.study_id,
            cand.instances,
            cand.outputs,
        )
        _unlink_files(catalog, store, cand, report)
    return report


def _unlink_files(
    catalog: Catalog, store: FileStore, cand: PurgeCandidate, report: PurgeReport
) -> None:
    paths = list(cand.files)
    if not paths:
        return
    with catalog.read() as session:
        # a path may have been recorded again since (the same bytes re-sent, a reused
        # job id): such a file belongs to the new row and stays
        still_used = _referenced(session, paths)
    folders = set()
    for rel in paths:
        if rel in still_used:
            report.files_kept += 1
            continue
        try:
            path = store.abspath(rel)
            size = path.stat().st_size
            os.unlink(path)
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as exc:
            LOGGER.warning("purge could not remove a file study_id=%d: %s", cand.study_id, exc)
            continue
        report.files_removed += 1
        report.bytes_freed += size
        if rel.startswith("outputs/"):
            folders.add(path.parent)
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()  # only when empty
