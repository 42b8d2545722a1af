"""Scale-out figures: the catalog's cost per job and per-instance ingest, SQLite against
PostgreSQL, and ingest with one and two receiver processes on one PostgreSQL.

``python -m tests.bench.scale_out`` prints a Markdown table. It starts its own
PostgreSQL (tests/storage/pg.py) and ``cspine serve --no-worker`` processes on
loopback. Environment: ``CSPINE_BENCH_JOBS`` (default 200) catalog round trips,
``CSPINE_BENCH_INSTANCES`` (default 400) instances per ingest run, sent by 4
concurrent associations of 64x64 slices.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from pydicom.uid import generate_uid
from pynetdicom import AE

from storage import Catalog
from storage.jobs import NewOutput, claim_next, complete_job, enqueue_job
from storage.models import OutboxState, Study, StudyState
from storage.outbox import claim_deliveries, record_delivery
from storage.records import DestinationSpec
from tests.conftest import free_port
from tests.dicom_node.proc import Server
from tests.helpers import CT, ct_slice

JOBS = int(os.environ.get("CSPINE_BENCH_JOBS", "200"))
INSTANCES = int(os.environ.get("CSPINE_BENCH_INSTANCES", "400"))
SENDERS = 4


def job_overhead_ms(url: str) -> float:
    """Catalog time of one job's life: queue, claim, complete with 3 outputs and their
    deliveries, claim the deliveries, record 3 outcomes (median ms per job)."""
    from storage.outbox import sync_destinations

    catalog = Catalog(url)
    sync_destinations(catalog, [DestinationSpec("PACS", "PACS", "127.0.0.1", 104)])
    times = []
    for i in range(JOBS):
        t0 = time.perf_counter()

        def queue(session, i=i):  # type: ignore[no-untyped-def]
            study = Study(
                study_instance_uid=f"2.25.{i}.{time.time_ns()}", state=StudyState.COMPLETE
            )
            session.add(study)
            session.flush()
            enqueue_job(session, study.id, "bench")

        catalog.write(queue)
        job = claim_next(catalog, "bench:1")
        assert job is not None
        outs = [
            NewOutput(
                kind, "1.2", generate_uid(), "1.2.3", f"outputs/{job.id}/{kind}.dcm", "0" * 64
            )
            for kind in ("seg", "sr", "summary")
        ]
        from storage.models import JobState

        complete_job(catalog, job.id, JobState.DONE, "bench", outs, worker="bench:1")
        for item in claim_deliveries(catalog, "bench:1", 600):
            record_delivery(catalog, item.id, OutboxState.SENT, "0x0000")
        times.append(time.perf_counter() - t0)
    catalog.dispose()
    return statistics.median(times) * 1000


def _send(port: int, count: int, seed: int) -> None:
    ae = AE(ae_title=f"BENCH{seed}")
    ae.add_requested_context(CT, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="CSPINE")
    assert assoc.is_established
    study, series = generate_uid(), generate_uid()
    for i in range(count):
        rsp = assoc.send_c_store(ct_slice(study, series, i, rows=64, cols=64, seed=seed))
        assert rsp.Status == 0
    assoc.release()


def ingest_rate(url: str, receivers: int, root: Path) -> float:
    """Instances per second acknowledged by ``receivers`` serve processes (4 senders)."""
    root.mkdir(parents=True, exist_ok=True)
    env = {
        "CSPINE_STORAGE__DATABASE_URL": url,
        "CSPINE_STORAGE__STORE_DIR": str(root / "store"),
        "CSPINE_STORAGE__MIN_FREE_BYTES": "0",
    }
    servers = [
        Server(root / f"host{i}", free_port(), "--no-worker", "--stable-seconds", "600", env=env)
        for i in range(receivers)
    ]
    try:
        for s in servers:
            s.start()
        per = INSTANCES // SENDERS
        threads = [
            threading.Thread(target=_send, args=(servers[i % receivers].port, per, i))
            for i in range(SENDERS)
        ]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return per * SENDERS / (time.perf_counter() - t0)
    finally:
        for s in servers:
            s.stop()


def main() -> None:
    from tests.storage.pg import PostgresServer, pg_bin_dir

    bin_dir = pg_bin_dir()
    if bin_dir is None:
        sys.exit("PostgreSQL is not installed (make system-tools)")
    server = PostgresServer(bin_dir)
    server.start()
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            sqlite = f"sqlite:///{root / 'jobs.sqlite'}"
            rows.append(
                (
                    "catalog per job, ms (median)",
                    job_overhead_ms(sqlite),
                    job_overhead_ms(server.create_database()),
                )
            )
            lite = ingest_rate(f"sqlite:///{root / 'a' / 'catalog.sqlite'}", 1, root / "a")
            pg1 = ingest_rate(server.create_database(), 1, root / "b")
            pg2 = ingest_rate(server.create_database(), 2, root / "c")
            rows.append(("ingest, instances/s, 1 receiver", lite, pg1))
            rows.append(("ingest, instances/s, 2 receivers", float("nan"), pg2))
    finally:
        server.stop()
    print(
        f"{JOBS} jobs; {INSTANCES} instances of 64x64 from {SENDERS} associations; "
        f"{os.cpu_count()} CPUs"
    )
    print("| measure | SQLite | PostgreSQL |")
    print("|---|---|---|")
    for name, a, b in rows:
        print(f"| {name} | {a:.1f} | {b:.1f} |")


if __name__ == "__main__":
    main()
