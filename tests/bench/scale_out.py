"""Scale-out figures: the catalog's cost per job and per-instance ingest, SQLite against
PostgreSQL, ingest with one and two receiver processes on one PostgreSQL, and studies
per hour with 1, 2 and 4 worker processes, with an Erlang-C projection for a site.

``python -m tests.bench.scale_out`` prints Markdown tables. It starts its own
PostgreSQL (tests/storage/pg.py), ``cspine serve --no-worker`` processes and workers
(tests/reliability/standin_worker.py: the real job path with a stand-in pipeline that
sleeps ``CSPINE_BENCH_INFER_S`` seconds in place of inference, as a GPU would free the
CPU) on loopback. Environment: ``CSPINE_BENCH_JOBS`` (default 200) catalog round trips,
``CSPINE_BENCH_INSTANCES`` (default 400) instances per ingest run, sent by 4
concurrent associations of 64x64 slices; ``CSPINE_BENCH_WORKER_STUDIES`` (default 16)
studies of 40 slices per worker run; ``CSPINE_BENCH_INFER_S`` (default 2.0).
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
from tests.dicom_node.scu_tools import serves_no_requests
from tests.helpers import CT, ct_slice

JOBS = int(os.environ.get("CSPINE_BENCH_JOBS", "200"))
WORKER_STUDIES = int(os.environ.get("CSPINE_BENCH_WORKER_STUDIES", "16"))
INFER_S = float(os.environ.get("CSPINE_BENCH_INFER_S", "2.0"))
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
    assoc = serves_no_requests(ae.associate("127.0.0.1", port, ae_title="CSPINE"))
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
        "CSPINE_NODE__RECEIVERS": "1",  # one receiver process per serve (host)
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


def studies_per_hour(url: str, workers: int, root: Path, studies: list[list[Path]]) -> float:
    """Studies per hour of ``workers`` worker processes on one catalog: the studies are
    received first, then all completed at once; timed from then to the last job's end."""
    import json
    import subprocess

    from sqlalchemy import select

    from config import load_settings
    from dicom_node.receive import Receiver, open_node_storage
    from storage.catalog import mark_complete, receiving_studies
    from storage.models import Job, JobState

    root.mkdir(parents=True, exist_ok=True)
    overrides = {
        "storage": {"data_dir": str(root), "database_url": url, "min_free_bytes": 0},
        "worker": {"poll_seconds": 0.1},
    }
    settings = load_settings(overrides=overrides, environ={})
    catalog, store = open_node_storage(settings)
    receiver = Receiver(settings, catalog, store, environ={})
    for paths in studies:
        for path in paths:
            assert receiver.accept(path, consume=False).status == 0
    logs = [root / f"worker{i}.log" for i in range(workers)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.reliability.standin_worker", json.dumps(overrides)],
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            env={**os.environ, "CSPINE_STANDIN_SECONDS": str(INFER_S)},
        )
        for log in logs
    ]
    try:
        deadline = time.monotonic() + 120
        while not all("worker ready" in log.read_text() for log in logs):
            assert time.monotonic() < deadline, "workers did not start"
            time.sleep(0.2)
        t0 = time.perf_counter()
        for study_id, seen in receiving_studies(catalog):
            assert mark_complete(catalog, study_id, seen, "bench")
        while True:
            with catalog.read() as session:
                states = list(session.scalars(select(Job.state)))
            if len(states) == len(studies) and all(
                st in (JobState.DONE, JobState.NOT_PROCESSED, JobState.FAILED) for st in states
            ):
                break
            time.sleep(0.1)
        elapsed = time.perf_counter() - t0
        assert set(states) == {JobState.DONE}, states
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)
        catalog.dispose()
    return len(studies) / elapsed * 3600


def erlang_c_wait(arrivals_per_h: float, service_s: float, servers: int) -> float:
    """Mean wait in the queue (seconds) of an M/M/c queue (Erlang C); inf if saturated."""
    import math

    a = arrivals_per_h * service_s / 3600  # offered load in servers
    rho = a / servers
    if rho >= 1:
        return math.inf
    top = a**servers / math.factorial(servers) / (1 - rho)
    p_wait = top / (sum(a**k / math.factorial(k) for k in range(servers)) + top)
    return p_wait * service_s / (servers * (1 - rho))


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
            from ai.synthetic import StudySpec, generate_study, write_study

            studies = [
                write_study(
                    generate_study(7000 + i, StudySpec.small(rows=64, cols=64, n_slices=40)),
                    root / "studies" / str(i),
                )
                for i in range(WORKER_STUDIES)
            ]
            sqlite_rate = studies_per_hour(
                f"sqlite:///{root / 'w-sqlite' / 'catalog.sqlite'}", 1, root / "w-sqlite", studies
            )
            worker_rows = [("SQLite", 1, sqlite_rate)]
            for n in (1, 2, 4):
                rate = studies_per_hour(server.create_database(), n, root / f"w-pg{n}", studies)
                worker_rows.append(("PostgreSQL", n, rate))
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
    print()
    print(f"{WORKER_STUDIES} studies of 40 slices; stand-in inference {INFER_S:.1f} s per study")
    print("| catalog | workers | studies/h | per study, s | ideal studies/h | overhead/study, s |")
    print("|---|---|---|---|---|---|")
    for engine, n, rate in worker_rows:
        per = 3600 / rate
        overhead = per * n - INFER_S
        ideal = n * 3600 / INFER_S
        print(f"| {engine} | {n} | {rate:.0f} | {per:.2f} | {ideal:.0f} | {overhead:.2f} |")
    print()
    print("Projection, 16 GPUs, 1,000 studies/day (peak hour 3x the mean: 125 studies/h), M/M/16:")
    print("| service time per study, s | utilisation | mean wait in queue, s |")
    print("|---|---|---|")
    for service in (6.0, 60.0, 300.0, 1200.0):
        rho = 125 * service / 3600 / 16
        wait = erlang_c_wait(125, service, 16)
        print(f"| {service:.0f} | {rho:.2f} | {wait:.1f} |")


if __name__ == "__main__":
    main()
