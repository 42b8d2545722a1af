"""Jobs: atomic claims, recorded state changes, outputs, and the reports on them.

Every function takes the :class:`~storage.db.Catalog` and returns records of
:mod:`storage.records`; the functions taking a ``Session`` are the building blocks
of this package's own transactions.

Claims are leases, safe for workers on several hosts sharing one PostgreSQL catalog:

* :func:`claim_next` takes the oldest QUEUED job with ``SELECT ... FOR UPDATE SKIP
  LOCKED`` (two workers never get the same row, and neither waits for the other's
  claim); on SQLite the write lock serialises claims and the clause is left out;
* the claiming worker renews its lease with :func:`heartbeat`, which also tells it
  whether the job is still its own;
* :func:`requeue_orphans` (any worker, any host) re-queues a RUNNING job whose heartbeat
  is stale or whose worker is known dead, locking each row it changes;
* :func:`complete_job` with ``worker`` records a result only while that worker still
  holds the job, so a job re-claimed elsewhere ends once, never twice.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, selectinload

from storage.db import Catalog
from storage.errors import LeaseLostError, NotFoundError
from storage.events import add_event
from storage.models import (
    Job,
    JobEvent,
    JobState,
    OutboxItem,
    OutboxState,
    Output,
    Refusal,
    Study,
    utcnow,
)
from storage.outbox import (
    dead_deliveries,
    held_deliveries,
    list_destinations,
    outbox_counts,
    queue_deliveries,
)
from storage.records import (
    DeliveryInfo,
    DestinationInfo,
    JobInfo,
    OutputInfo,
    RefusalInfo,
    StatusReport,
)

LOGGER = logging.getLogger(__name__)
MAX_ATTEMPTS = 3
"""Claims of one job (worker deaths included) before it is failed."""
STALE_AFTER_S = 120.0
"""A RUNNING job whose heartbeat is older than this has lost its worker (any host)."""
FINISHED = (JobState.DONE, JobState.NOT_PROCESSED)
"""The states of a job with a result."""


def _transition(session: Session, job: Job, state: JobState, reason: str | None) -> None:
    job.state = state
    job.reason = reason
    job.updated_at = utcnow()
    session.add(JobEvent(job_id=job.id, state=state, reason=reason))


def enqueue_job(session: Session, study_id: int, reason: str) -> int:
    """Queue a new job version for a study (older queued versions are superseded);
    returns the version. Inside a catalog transaction.

    The study row is locked first (PostgreSQL), so two hosts queueing a version of the
    same study at once (completion, replay) take turns; ``(study_id, version)`` is
    unique as a last guard."""
    session.execute(select(Study.id).where(Study.id == study_id).with_for_update())
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
    return version


def _study_id(session: Session, ref: str) -> int:
    found = None
    if ref.isdigit():
        found = session.scalar(select(Study.id).where(Study.id == int(ref)))
    if found is None:
        found = session.scalar(select(Study.id).where(Study.study_instance_uid == ref))
    if found is None:
        raise NotFoundError(f"no study with id or Study Instance UID {ref!r}")
    return int(found)


def replay_study(catalog: Catalog, ref: str, reason: str = "replay requested") -> int:
    """Queue a new job version for the study ``ref`` (id or UID); returns the version.

    Raises
    ------
    NotFoundError
        When no study matches.
    """
    return catalog.write(lambda s: enqueue_job(s, _study_id(s, ref), reason))


def claim_next(catalog: Catalog, worker: str) -> JobInfo | None:
    """Atomically move the oldest QUEUED job to RUNNING for ``worker``."""

    def claim(session: Session) -> JobInfo | None:
        job = session.scalars(
            select(Job)
            .where(Job.state == JobState.QUEUED)
            .order_by(Job.id)
            .limit(1)
            .with_for_update(skip_locked=True)
        ).first()
        if job is None:
            return None
        job.attempts += 1
        job.worker = worker
        job.heartbeat_at = utcnow()
        _transition(session, job, JobState.RUNNING, f"claimed by {worker}, attempt {job.attempts}")
        session.flush()
        return JobInfo.of(job)

    return catalog.write(claim)


def job_state(catalog: Catalog, job_id: int) -> JobState | None:
    """A job's current state (``None`` if the job is gone, e.g. purged)."""
    with catalog.read() as session:
        state = session.scalar(select(Job.state).where(Job.id == job_id))
        return None if state is None else JobState(state)


def heartbeat(catalog: Catalog, job_id: int, worker: str | None = None) -> bool:
    """Record that the worker of a RUNNING job is alive (renew its lease).

    With ``worker``, only while the job is RUNNING under that worker; returns whether
    the lease was renewed (``False``: the job was re-queued or claimed by another).
    """
    stmt = update(Job).where(Job.id == job_id)
    if worker is not None:
        stmt = stmt.where(Job.worker == worker, Job.state == JobState.RUNNING)

    def beat(session: Session) -> int:
        result = session.execute(stmt.values(heartbeat_at=utcnow()))
        return int(getattr(result, "rowcount", 0))

    return bool(catalog.write(beat))


def finish_job(
    catalog: Catalog,
    job_id: int,
    state: JobState,
    reason: str | None,
    *,
    worker: str | None = None,
    **fields: object,
) -> None:
    """Move a job to a final state with its reason and result fields (no outputs)."""
    complete_job(catalog, job_id, state, reason or "", (), None, worker=worker, **fields)


def requeue_orphans(
    catalog: Catalog, is_alive: Callable[[str], bool], stale_after_s: float = STALE_AFTER_S
) -> list[int]:
    """Re-queue RUNNING jobs whose worker died (or fail them after MAX_ATTEMPTS).

    Safe to run on several hosts at once: each RUNNING row is locked (``FOR UPDATE
    SKIP LOCKED`` on PostgreSQL; a row another host is changing is left to it) and
    judged on its current values.

    Parameters
    ----------
    is_alive
        Tells whether a worker id may still run; ``False`` only for a worker known to be
        dead (e.g. no such PID on this host). Workers of other hosts are judged by their
        heartbeat alone.
    stale_after_s
        A job whose heartbeat is older than this is orphaned whatever ``is_alive`` says.
    """

    def change(session: Session) -> list[int]:
        out = []
        limit = utcnow() - dt.timedelta(seconds=stale_after_s)
        running = (
            select(Job)
            .where(Job.state == JobState.RUNNING)
            .order_by(Job.id)
            .with_for_update(skip_locked=True)
        )
        for job in session.scalars(running):
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


def complete_job(
    catalog: Catalog,
    job_id: int,
    state: JobState,
    reason: str,
    outputs: Sequence[NewOutput],
    destinations: Sequence[DestinationInfo] | None = None,
    *,
    worker: str | None = None,
    **fields: object,
) -> None:
    """Record outputs, queue their deliveries and finish the job, in one transaction.

    Parameters
    ----------
    destinations
        Where the outputs go (each takes the kinds it lists); default: every active
        destination row.
    worker
        The worker that claimed the job: the result is recorded only while the job is
        RUNNING under it (the row is locked while this is checked).
    fields
        Job columns to set (``result_json``, ``series_instance_uid``, ...).

    Raises
    ------
    LeaseLostError
        When ``worker`` no longer holds the job.
    """

    def change(session: Session) -> None:
        job = session.get(Job, job_id, with_for_update=True)
        if job is None:
            raise NotFoundError(f"no job with id {job_id}")
        if worker is not None and (job.state is not JobState.RUNNING or job.worker != worker):
            raise LeaseLostError(
                f"job {job_id} is no longer held by {worker} "
                f"(state {job.state.value}, worker {job.worker})"
            )
        rows = []
        for out in outputs:
            row = Output(job_id=job_id, **asdict(out))
            session.add(row)
            rows.append(row)
        session.flush()
        queue_deliveries(session, rows, destinations)
        for key, value in fields.items():
            setattr(job, key, value)
        _transition(session, job, state, reason)
        add_event(session, job.study_id, f"job-{state.value.lower()}", f"job {job.id}: {reason}")

    catalog.write(change)


def _job_info(session: Session, job: Job) -> JobInfo:
    outs = list(session.scalars(select(Output).where(Output.job_id == job.id).order_by(Output.id)))
    items: dict[int, list[OutboxItem]] = {o.id: [] for o in outs}
    if outs:
        for item in session.scalars(
            select(OutboxItem)
            .options(selectinload(OutboxItem.output), selectinload(OutboxItem.destination))
            .where(OutboxItem.output_id.in_(list(items)))
            .order_by(OutboxItem.id)
        ):
            items[item.output_id].append(item)
    events = list(
        session.scalars(select(JobEvent).where(JobEvent.job_id == job.id).order_by(JobEvent.id))
    )
    return JobInfo.of(
        job, events=events, outputs=tuple(OutputInfo.of(o, items[o.id]) for o in outs)
    )


def _latest(session: Session, study_id: int, states: Sequence[JobState]) -> Job | None:
    stmt = select(Job).where(Job.study_id == study_id)
    if states:
        stmt = stmt.where(Job.state.in_(list(states)))
    return session.scalars(stmt.order_by(Job.version.desc()).limit(1)).first()


def latest_job(catalog: Catalog, study_id: int, states: Sequence[JobState] = ()) -> JobInfo | None:
    """The newest job of a study (optionally only in ``states``), with its outputs."""
    with catalog.read() as session:
        job = _latest(session, study_id, states)
        return None if job is None else _job_info(session, job)


def study_jobs(catalog: Catalog, study_id: int) -> list[JobInfo]:
    """Every job of a study, oldest first, with state history, outputs and deliveries."""
    with catalog.read() as session:
        jobs = session.scalars(select(Job).where(Job.study_id == study_id).order_by(Job.id))
        return [_job_info(session, j) for j in jobs]


def resend_results(
    catalog: Catalog, ref: str, destinations: Sequence[DestinationInfo] | None = None
) -> int:
    """Queue the newest result of study ``ref`` again (same files, same UIDs).

    Returns how many deliveries were queued.

    Raises
    ------
    NotFoundError
        When no study matches, or it has no result with outputs.
    """

    def change(session: Session) -> int:
        study_id = _study_id(session, ref)
        # locked (PostgreSQL) against a purge of the study on another host
        session.execute(select(Study.id).where(Study.id == study_id).with_for_update())
        job = _latest(session, study_id, FINISHED)
        outs = (
            []
            if job is None
            else list(session.scalars(select(Output).where(Output.job_id == job.id)))
        )
        if not outs:
            raise NotFoundError(f"study {ref} has no results to send")
        return queue_deliveries(session, outs, destinations)

    return catalog.write(change)


def status_report(catalog: Catalog, recent: int = 10) -> StatusReport:
    """Queue depth, running jobs, outbox, recent failures and refusals."""
    with catalog.read() as session:
        counts = dict(
            session.execute(select(Job.state, func.count(Job.id)).group_by(Job.state)).all()
        )
        running = session.scalars(select(Job).where(Job.state == JobState.RUNNING).order_by(Job.id))
        failed = session.scalars(
            select(Job)
            .where(Job.state == JobState.FAILED)
            .order_by(Job.updated_at.desc())
            .limit(recent)
        )
        refusals = session.scalars(select(Refusal).order_by(Refusal.id.desc()).limit(recent))
        report = StatusReport(
            job_counts={JobState(s): int(n) for s, n in counts.items()},
            running=tuple(JobInfo.of(j) for j in running),
            outbox_counts=outbox_counts(session),
            failed_jobs=tuple(JobInfo.of(j) for j in failed),
            dead_deliveries=tuple(dead_deliveries(session, recent)),
            held_deliveries=tuple(held_deliveries(session, recent)),
            refusals=tuple(RefusalInfo.of(r) for r in refusals),
        )
    return replace(report, destinations=tuple(list_destinations(catalog)))


__all__ = [
    "FINISHED",
    "MAX_ATTEMPTS",
    "STALE_AFTER_S",
    "DeliveryInfo",
    "LeaseLostError",
    "NewOutput",
    "OutboxState",
    "claim_next",
    "complete_job",
    "enqueue_job",
    "finish_job",
    "heartbeat",
    "job_state",
    "latest_job",
    "replay_study",
    "requeue_orphans",
    "resend_results",
    "status_report",
    "study_jobs",
]
