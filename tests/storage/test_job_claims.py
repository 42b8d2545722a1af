"""Job claims as leases on one catalog shared by several workers (hosts), on SQLite and a
real PostgreSQL: every job is claimed once, a stale lease is taken over once, and a
worker that lost its lease records nothing."""

from __future__ import annotations

import datetime as dt
import threading

import pytest
from sqlalchemy import func, select, text, update

from storage import Catalog
from storage.errors import LeaseLostError
from storage.jobs import (
    NewOutput,
    claim_next,
    complete_job,
    enqueue_job,
    heartbeat,
    requeue_orphans,
)
from storage.models import Job, JobEvent, JobState, Output, Study, StudyState, utcnow


def _queue_jobs(catalog: Catalog, n: int) -> list[int]:
    def add(session) -> list[int]:  # type: ignore[no-untyped-def]
        ids = []
        for i in range(n):
            study = Study(study_instance_uid=f"1.2.{i}", state=StudyState.COMPLETE)
            session.add(study)
            session.flush()
            enqueue_job(session, study.id, "test")
            ids.append(study.id)
        return ids

    catalog.write(add)
    with catalog.read() as s:
        return list(s.scalars(select(Job.id).order_by(Job.id)))


def _output(job_id: int, who: str) -> NewOutput:
    return NewOutput(
        "sr",
        "1.2.840.10008.5.1.4.1.1.88.34",
        f"2.25.{job_id}{abs(hash(who))}",
        "2.25.9",
        f"outputs/{job_id}/{who}.dcm",
        "0" * 64,
    )


def test_workers_on_two_engines_claim_every_job_exactly_once(database_url: str) -> None:
    hosts = [Catalog(database_url), Catalog(database_url)]
    job_ids = _queue_jobs(hosts[0], 30)
    claimed: list[tuple[str, int]] = []
    lock = threading.Lock()
    start = threading.Barrier(6)

    def worker(i: int) -> None:
        name = f"host{i % 2}:{100 + i}"
        start.wait()
        while (job := claim_next(hosts[i % 2], name)) is not None:
            with lock:
                claimed.append((name, job.id))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(j for _, j in claimed) == job_ids  # each once, none lost
    with hosts[0].read() as s:
        rows = {j.id: j for j in s.scalars(select(Job))}
    assert all(r.state is JobState.RUNNING and r.attempts == 1 for r in rows.values())
    assert {(r.worker, r.id) for r in rows.values()} == set(claimed)
    for catalog in hosts:
        catalog.dispose()


def test_a_claim_skips_a_row_another_host_holds_locked(postgres_server) -> None:
    """PostgreSQL: a row locked by another transaction (a claim in flight elsewhere) is
    skipped at once, not waited for."""
    url = postgres_server.create_database()
    catalog = Catalog(url)
    first, second = _queue_jobs(catalog, 2)
    other = Catalog(url)
    try:
        with other.engine.connect() as conn:
            conn.execute(text("SELECT id FROM jobs WHERE id = :id FOR UPDATE"), {"id": first})
            got: list[object] = []
            claimer = threading.Thread(target=lambda: got.append(claim_next(catalog, "h1:1")))
            claimer.start()
            claimer.join(10)  # without SKIP LOCKED it waits for the lock held here
            waited = claimer.is_alive()
            conn.rollback()
        claimer.join(10)
        assert not waited, "the claim waited for a row another host holds"
        job = got[0]
        assert job is not None and job.id == second  # type: ignore[attr-defined]
        job = claim_next(catalog, "host1:1")
        assert job is not None and job.id == first
    finally:
        catalog.dispose()
        other.dispose()
        postgres_server.drop_database(url)


def _age_heartbeat(catalog: Catalog, job_id: int, seconds: float) -> None:
    old = utcnow() - dt.timedelta(seconds=seconds)
    catalog.write(lambda s: s.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=old)))


def test_a_stale_lease_is_taken_over_and_the_first_worker_records_nothing(
    database_url: str,
) -> None:
    catalog = Catalog(database_url)
    (job_id,) = _queue_jobs(catalog, 1)
    a = claim_next(catalog, "hostA:1")
    assert a is not None and heartbeat(catalog, job_id, "hostA:1")
    # another host's worker: alive as far as anyone here can tell, heartbeat fresh
    assert requeue_orphans(catalog, lambda w: True) == []
    _age_heartbeat(catalog, job_id, 600)  # hostA hangs past the stale limit
    assert requeue_orphans(catalog, lambda w: True) == [job_id]
    b = claim_next(catalog, "hostB:2")
    assert b is not None and b.id == job_id and b.attempts == 2
    assert not heartbeat(catalog, job_id, "hostA:1")  # A learns it lost the lease
    with pytest.raises(LeaseLostError):
        complete_job(
            catalog, job_id, JobState.DONE, "A", [_output(job_id, "a")], [], worker="hostA:1"
        )
    complete_job(catalog, job_id, JobState.DONE, "B", [_output(job_id, "b")], [], worker="hostB:2")
    with pytest.raises(LeaseLostError):  # and never after B either
        complete_job(
            catalog, job_id, JobState.DONE, "A", [_output(job_id, "a")], [], worker="hostA:1"
        )
    with catalog.read() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.state is JobState.DONE and job.reason == "B"
        assert [o.file_path for o in s.scalars(select(Output))] == [f"outputs/{job_id}/b.dcm"]
        done = s.scalar(select(func.count(JobEvent.id)).where(JobEvent.state == JobState.DONE))
        assert done == 1
    catalog.dispose()


def test_hosts_recovering_at_once_requeue_each_stale_job_once(database_url: str) -> None:
    hosts = [Catalog(database_url) for _ in range(3)]
    job_ids = _queue_jobs(hosts[0], 10)
    for job_id in job_ids:
        assert claim_next(hosts[0], "deadhost:7") is not None
        _age_heartbeat(hosts[0], job_id, 600)
    found: list[int] = []
    start = threading.Barrier(3)

    def recover(i: int) -> None:
        start.wait()
        found.extend(requeue_orphans(hosts[i], lambda w: True))

    threads = [threading.Thread(target=recover, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(found) == job_ids
    with hosts[0].read() as s:
        requeued = s.scalar(
            select(func.count(JobEvent.id)).where(JobEvent.reason.like("%re-queued"))
        )
        assert requeued == 10
        assert set(s.scalars(select(Job.state))) == {JobState.QUEUED}
    for catalog in hosts:
        catalog.dispose()
