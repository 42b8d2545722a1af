"""Text the admin CLI prints from the catalog's records (no catalog access here)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from storage.models import JobState, OutboxState
from storage.records import JobInfo, StatusReport


def job_lines(jobs: Sequence[JobInfo]) -> Iterator[str]:
    """Every job of a study, its state history and its deliveries."""
    if not jobs:
        return
    yield "  jobs:"
    for job in jobs:
        yield f"    job {job.id} v{job.version} {job.state.value}: {job.reason or ''}"
        for ev in job.events:
            yield f"      {ev.at:%H:%M:%S}Z {ev.state.value}: {ev.reason or ''}"
        for out in job.outputs:
            for item in out.deliveries:
                yield (
                    f"      {out.kind} -> {item.destination.name}: {item.state.value} "
                    f"after {item.attempts} attempt(s), last {item.last_status or '-'}"
                )


def status_lines(report: StatusReport) -> Iterator[str]:
    """Queue depth, running jobs, destinations, outbox and recent failures."""
    counts = report.job_counts
    yield "jobs: " + ", ".join(f"{s.value} {counts.get(s, 0)}" for s in JobState)
    for job in report.running:
        beat = f"{job.heartbeat_at:%H:%M:%S}Z" if job.heartbeat_at else "-"
        yield f"  running: job {job.id} (study {job.study_id}) on {job.worker}, heartbeat {beat}"
    box = report.outbox_counts
    yield "outbox: " + ", ".join(f"{s.value} {box.get(s, 0)}" for s in OutboxState)
    for dest in report.destinations:
        state = "active" if dest.active else "REMOVED from the configuration"
        transport = "TLS" if dest.tls else "plain TCP"
        yield (
            f"  destination {dest.id} {dest.name} ({dest.address}, {transport}, "
            f"{','.join(dest.outputs)}): {state}"
        )
    if report.held_deliveries:
        yield "held deliveries (destination no longer configured; not sent):"
    for item in report.held_deliveries:
        why = item.last_error or ""
        yield f"  delivery {item.id} {item.kind} -> {item.destination.name}: {why}"
    if report.failed_jobs or report.dead_deliveries:
        yield "recent failures:"
    for job in report.failed_jobs:
        yield f"  job {job.id} (study {job.study_id}) FAILED: {job.reason}"
    for item in report.dead_deliveries:
        why = f"{item.last_status} {item.last_error or ''}"
        yield (
            f"  delivery {item.id} {item.kind} -> {item.destination.name} DEAD after "
            f"{item.attempts} attempt(s): {why} (cspine resend queues it again)"
        )
    if report.refusals:
        yield "recent refusals on receipt:"
    for ref in report.refusals:
        yield (
            f"  {ref.refused_at:%Y-%m-%d %H:%M:%S}Z from {ref.calling_ae or '(import)'} "
            f"0x{ref.status:04X}: {ref.reason}"
        )
