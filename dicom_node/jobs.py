"""Catalog reports about jobs, results and the outbox, for the admin CLI."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ai.types import INCOMPLETE_CODES, Finding, VertebraResult
from dicom_node.result import JobResult
from storage import Catalog
from storage import jobs as storage_jobs
from storage.models import Job, JobState, OutboxItem, OutboxState, Output, Refusal


def latest_job(session: Session, study_id: int, states: tuple[JobState, ...] = ()) -> Job | None:
    """The newest job of a study, optionally restricted to some states."""
    stmt = select(Job).where(Job.study_id == study_id)
    if states:
        stmt = stmt.where(Job.state.in_(states))
    return session.scalars(stmt.order_by(Job.version.desc()).limit(1)).first()


def describe_jobs(session: Session, study_id: int) -> Iterator[str]:
    """Lines describing every job of a study, its state history and deliveries."""
    jobs = session.scalars(select(Job).where(Job.study_id == study_id).order_by(Job.id)).all()
    if not jobs:
        return
    yield "  jobs:"
    for job in jobs:
        yield f"    job {job.id} v{job.version} {job.state.value}: {job.reason or ''}"
        for ev in job.events:
            yield f"      {ev.at:%H:%M:%S}Z {ev.state.value}: {ev.reason or ''}"
        for out in job.outputs:
            items = session.scalars(select(OutboxItem).where(OutboxItem.output_id == out.id))
            for item in items:
                yield (
                    f"      {out.kind} -> {item.destination}: {item.state.value} "
                    f"after {item.attempts} attempt(s), last {item.last_status or '-'}"
                )


def _verdict(p: float | None, threshold: float, vertebra: VertebraResult | None) -> str:
    if p is None:
        reason = (vertebra.reason if vertebra else None) or "no reason given"
        return f"not assessed: {reason}"
    return "FRACTURE" if p >= threshold else "no fracture"


def _finding_lines(findings: Sequence[Finding]) -> Iterator[str]:
    for f in findings:
        yield f"check failed ({f.stage}, {f.check}): {f.message}"


def _patient_word(record: JobResult, threshold: float) -> str:
    patient = record.patient_probability
    if patient is None:
        return "not assessed: " + (
            "; ".join(f"{f.stage} {f.message}" for f in record.findings if f.stage == "stage2")
            or "no vertebra could be assessed"
        )
    refused = [v for v in record.vertebrae if not v.assessed and v.reason_code in INCOMPLETE_CODES]
    if refused and patient < threshold:
        return "incomplete: no fracture in the assessed levels; " + ", ".join(
            f"{v.label} not assessed" for v in refused
        )
    return _verdict(patient, threshold, None)


def record_lines(record: JobResult) -> Iterator[str]:
    """The result table of one job's result record (without its job line)."""
    if record.outcome == "not_processed":
        yield f"not processed: {record.reason}"
        yield from _finding_lines(record.findings)
        return
    yield f"series: {record.series_instance_uid}"
    yield f"selection: {record.selection}"
    threshold = math.nan if record.threshold is None else record.threshold
    yield f"{'VERTEBRA':<9} {'ASSESSED':<9} {'PROBABILITY':>11}  RESULT"
    for v in record.vertebrae:
        prob = "-" if v.probability is None else f"{v.probability:.3f}"
        flag = "yes" if v.assessed else "no"
        yield f"{v.label:<9} {flag:<9} {prob:>11}  {_verdict(v.probability, threshold, v)}"
    patient = record.patient_probability
    word = _patient_word(record, threshold)
    yield f"{'patient':<9} {'':<9} {('-' if patient is None else f'{patient:.3f}'):>11}  {word}"
    yield f"threshold: {record.threshold}"
    yield from _finding_lines(record.findings)
    for m in record.models:
        demo = "  [synthetic demo weights, not for clinical use]" if m.demo else ""
        yield f"model: {m.name} {m.version} sha256 {(m.sha256 or '')[:12]}{demo}"
    yield "timings: " + ", ".join(f"{k} {v:.2f}s" for k, v in record.timings.items())


def job_result_lines(finished: Any, newest: Any = None) -> Iterator[str]:
    """The result table of ``finished``, the newest DONE or NOT_PROCESSED job of a study
    (``None``: none yet, and ``newest`` is the study's newest job, if any).

    Jobs are read by attribute (``id``, ``version``, ``state``, ``result_json``): the
    catalog's job records.
    """
    if finished is None:
        state = newest.state.value if newest else "no job"
        yield f"no result yet ({state})"
        return
    yield f"job {finished.id} version {finished.version}: {finished.state.value}"
    yield from record_lines(JobResult.from_json(finished.result_json))


def result_lines(catalog: Catalog | Session, study_id: int) -> Iterator[str]:
    """The result table of the newest finished job of a study (``cspine results``)."""
    finished: Any
    newest: Any
    if isinstance(catalog, Catalog):
        finished = storage_jobs.latest_job(catalog, study_id, storage_jobs.FINISHED)
        newest = None if finished else storage_jobs.latest_job(catalog, study_id)
    else:  # TEMPORARY: a Session, as the CLI passes one today
        finished = latest_job(catalog, study_id, (JobState.DONE, JobState.NOT_PROCESSED))
        newest = None if finished else latest_job(catalog, study_id)
    yield from job_result_lines(finished, newest)


def status_lines(session: Session, recent: int = 10) -> Iterator[str]:
    """Queue depth, running jobs, outbox and recent failures."""
    counts = dict(session.execute(select(Job.state, func.count(Job.id)).group_by(Job.state)).all())
    yield "jobs: " + ", ".join(f"{s.value} {counts.get(s, 0)}" for s in JobState)
    for job in session.scalars(select(Job).where(Job.state == JobState.RUNNING)):
        yield (
            f"  running: job {job.id} (study {job.study_id}) on {job.worker}, "
            f"heartbeat {job.heartbeat_at:%H:%M:%S}Z"
        )
    box = dict(
        session.execute(
            select(OutboxItem.state, func.count(OutboxItem.id)).group_by(OutboxItem.state)
        ).all()
    )
    yield "outbox: " + ", ".join(f"{s.value} {box.get(s, 0)}" for s in OutboxState)
    failed = session.scalars(
        select(Job)
        .where(Job.state == JobState.FAILED)
        .order_by(Job.updated_at.desc())
        .limit(recent)
    ).all()
    dead = session.scalars(
        select(OutboxItem)
        .where(OutboxItem.state == OutboxState.DEAD)
        .order_by(OutboxItem.id.desc())
        .limit(recent)
    ).all()
    if failed or dead:
        yield "recent failures:"
    for job in failed:
        yield f"  job {job.id} (study {job.study_id}) FAILED: {job.reason}"
    for item in dead:
        out = session.get(Output, item.output_id)
        kind = out.kind if out else "?"
        why = f"{item.last_status} {item.last_error or ''}"
        yield f"  delivery {item.id} {kind} -> {item.destination} DEAD: {why}"
    refusals = session.scalars(select(Refusal).order_by(Refusal.id.desc()).limit(recent)).all()
    if refusals:
        yield "recent refusals on receipt:"
    for ref in refusals:
        yield (
            f"  {ref.refused_at:%Y-%m-%d %H:%M:%S}Z from {ref.calling_ae or '(import)'} "
            f"0x{ref.status:04X}: {ref.reason}"
        )
