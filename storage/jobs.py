"""Jobs and the outbox: atomic claims, recorded state changes, delivery bookkeeping."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from storage.catalog import add_event
from storage.db import Catalog
from storage.models import Job, JobEvent, JobState, OutboxItem, OutboxState, Output, utcnow

LOGGER = logging.getLogger(__name__)
MAX_ATTEMPTS = 3


def _transition(session: Session, job: Job, state: JobState, reason: str | None) -> None:
    job.state = state
    job.reason = reason
    job.updated_at = utcnow()
    session.add(JobEvent(job_id=job.id, state=state, reason=reason))


def enqueue_job(session: Session, study_id: int, reason: str) -> Job:
    """Queue a new job version for a study; older queued versions are superseded."""
    version = (
        session.scalar(select(func.max(Job.version)).where(Job.study_id == study_id)) or 0
    ) + 1
    for old in session.scalars(
        select(Job).where(Job.study_id == study_id, Job.state == JobState.QUEUED)
    ):
        _transition(session, old, JobState.SUPERSEDED, f"superseded by version {version}")
    job = Job(study_id=study_id, version=version, state=JobState.QUEUED, attempts=0)
    session.add(job)
    session.flush()
    session.add(JobEvent(job_id=job.id, state=JobState.QUEUED, reason=reason))
    job.reason = reason
    add_event(session, study_id, "job-queued", f"job {job.id} version {version}: {reason}")
    return job


def claim_next(catalog: Catalog, worker: str) -> Job | None:
    """Atomically move the oldest QUEUED job to RUNNING for ``worker``."""

    def claim(session: Session) -> Job | None:
        job = session.scalars(
            select(Job).where(Job.state == JobState.QUEUED).order_by(Job.id).limit(1)
        ).first()
        if job is None:
            return None
        job.attempts += 1
        job.worker = worker
        job.heartbeat_at = utcnow()
        _transition(session, job, JobState.RUNNING, f"claimed by {worker}, attempt {job.attempts}")
        return job

    return catalog.write(claim)


def heartbeat(catalog: Catalog, job_id: int) -> None:
    """Record that the worker of a RUNNING job is alive."""
    catalog.write(
        lambda s: s.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=utcnow()))
    )


def finish_job(
    catalog: Catalog,
    job_id: int,
    state: JobState,
    reason: str | None,
    **fields: object,
) -> None:
    """Move a job to a final state with its reason and result fields (no outputs)."""
    complete_job(catalog, job_id, state, reason or "", (), {}, **fields)


def requeue_orphans(
    catalog: Catalog, is_alive: Callable[[str], bool], stale_after_s: float = 120.0
) -> list[int]:
    """Re-queue RUNNING jobs whose worker died (or fail them after MAX_ATTEMPTS).

    Parameters
    ----------
    is_alive
        Tells whether a worker id still runs (e.g. a PID check on this host).
    stale_after_s
        A job whose heartbeat is older than this is orphaned whatever ``is_alive`` says.
    """

    def change(session: Session) -> list[int]:
        out = []
        limit = utcnow() - dt.timedelta(seconds=stale_after_s)
        for job in session.scalars(select(Job).where(Job.state == JobState.RUNNING)):
            stale = job.heartbeat_at is None or job.heartbeat_at < limit
            if is_alive(job.worker or "") and not stale:
                continue
            if job.attempts >= MAX_ATTEMPTS:
                _transition(session, job, JobState.FAILED, f"worker died {job.attempts} times")
            else:
                _transition(session, job, JobState.QUEUED, f"worker {job.worker} died; re-queued")
            out.append(job.id)
        return out

    return catalog.write(change)


@dataclass(frozen=True)
class NewOutput:
    """An output file already written to the store, to record with its deliveries."""

    kind: str
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    file_path: str
    sha256: str


def queue_deliveries(
    session: Session,
    outputs: Sequence[Output],
    destinations: Sequence[str],
    kinds: Mapping[str, Sequence[str]] | None = None,
) -> int:
    """Queue (or re-queue) delivery of outputs; returns how many rows were queued."""
    n = 0
    for dest in destinations:
        for out in outputs:
            if kinds is not None and out.kind not in kinds.get(dest, ()):
                continue
            item = session.scalar(
                select(OutboxItem).where(
                    OutboxItem.output_id == out.id, OutboxItem.destination == dest
                )
            )
            if item is None:
                item = OutboxItem(output_id=out.id, destination=dest, attempts=0)
                session.add(item)
            item.state = OutboxState.PENDING
            item.next_attempt_at = utcnow()
            n += 1
    return n


def due_deliveries(catalog: Catalog, now: dt.datetime | None = None) -> list[OutboxItem]:
    """PENDING outbox rows whose next attempt is due, with their outputs loaded."""
    from sqlalchemy.orm import selectinload

    when = now or utcnow()
    with catalog.read() as session:
        return list(
            session.scalars(
                select(OutboxItem)
                .options(selectinload(OutboxItem.output))
                .where(OutboxItem.state == OutboxState.PENDING, OutboxItem.next_attempt_at <= when)
                .order_by(OutboxItem.id)
            )
        )


def record_delivery(
    catalog: Catalog,
    item_id: int,
    state: OutboxState,
    status: str,
    error: str | None = None,
    retry_in_s: float | None = None,
) -> None:
    """Record one delivery attempt."""

    def change(session: Session) -> None:
        item = session.get(OutboxItem, item_id)
        assert item is not None
        item.attempts += 1
        item.state = state
        item.last_status = status
        item.last_error = error
        if state is OutboxState.SENT:
            item.sent_at = utcnow()
        if retry_in_s is not None:
            item.next_attempt_at = utcnow() + dt.timedelta(seconds=retry_in_s)
            item.wait_seconds = retry_in_s

    catalog.write(change)


def complete_job(
    catalog: Catalog,
    job_id: int,
    state: JobState,
    reason: str,
    outputs: Sequence[NewOutput],
    destinations: Mapping[str, Sequence[str]],
    **fields: object,
) -> None:
    """Record outputs, queue their deliveries and finish the job, in one transaction.

    Parameters
    ----------
    destinations
        ``{"AE@HOST:PORT": ("seg", "sr", ...)}``: which output kinds go where.
    """

    def change(session: Session) -> None:
        job = session.get(Job, job_id)
        assert job is not None
        rows = []
        for out in outputs:
            row = Output(job_id=job_id, **out.__dict__)
            session.add(row)
            rows.append(row)
        session.flush()
        queue_deliveries(session, rows, list(destinations), kinds=dict(destinations))
        for key, value in fields.items():
            setattr(job, key, value)
        _transition(session, job, state, reason)
        add_event(session, job.study_id, f"job-{state.value.lower()}", f"job {job.id}: {reason}")

    catalog.write(change)
