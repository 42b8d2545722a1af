"""Catalog reports about jobs, results and the outbox, for the admin CLI."""

from __future__ import annotations

import json
from collections.abc import Iterator

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ai.types import INCOMPLETE_CODES
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


def _verdict(p: float | None, threshold: float, vertebra: dict | None) -> str:
    if p is None:
        reason = (vertebra or {}).get("reason") or "no reason given"
        return f"not assessed: {reason}"
    return "FRACTURE" if p >= threshold else "no fracture"


def _finding_lines(findings: list[dict]) -> Iterator[str]:
    for f in findings:
        yield f"check failed ({f['stage']}, {f['check']}): {f['message']}"


def result_lines(session: Session, study_id: int) -> Iterator[str]:
    """The result table of the newest finished job of a study."""
    job = latest_job(session, study_id, (JobState.DONE, JobState.NOT_PROCESSED))
    if job is None:
        running = latest_job(session, study_id)
        state = running.state.value if running else "no job"
        yield f"no result yet ({state})"
        return
    data = json.loads(job.result_json or "{}")
    yield f"job {job.id} version {job.version}: {job.state.value}"
    findings = data.get("findings") or []
    if "not_processed" in data:
        yield f"not processed: {data['not_processed']}"
        yield from _finding_lines(findings)
        return
    yield f"series: {data['series_instance_uid']}"
    yield f"selection: {data['selection']}"
    threshold = float(data["threshold"])
    yield f"{'VERTEBRA':<9} {'ASSESSED':<9} {'PROBABILITY':>11}  RESULT"
    for v in data["vertebrae"]:
        prob = "-" if v["probability"] is None else f"{v['probability']:.3f}"
        flag = "yes" if v["assessed"] else "no"
        yield f"{v['label']:<9} {flag:<9} {prob:>11}  {_verdict(v['probability'], threshold, v)}"
    patient = data["patient_probability"]
    if patient is None:
        word = "not assessed: " + (
            "; ".join(f"{f['stage']} {f['message']}" for f in findings if f["stage"] == "stage2")
            or "no vertebra could be assessed"
        )
    else:
        word = _verdict(patient, threshold, None)
        refused = [
            v
            for v in data["vertebrae"]
            if not v["assessed"] and v.get("reason_code") in INCOMPLETE_CODES
        ]
        if refused and patient < threshold:
            word = "incomplete: no fracture in the assessed levels; " + ", ".join(
                f"{v['label']} not assessed" for v in refused
            )
    yield f"{'patient':<9} {'':<9} {('-' if patient is None else f'{patient:.3f}'):>11}  {word}"
    yield f"threshold: {data['threshold']}"
    yield from _finding_lines(findings)
    for m in data["models"]:
        demo = "  [synthetic demo weights, not for clinical use]" if m["demo"] else ""
        yield f"model: {m['name']} {m['version']} sha256 {m['sha256'][:12]}{demo}"
    yield "timings: " + ", ".join(f"{k} {v:.2f}s" for k, v in data["timings"].items())


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
