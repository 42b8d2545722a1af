"""Scale-out on one PostgreSQL: two receivers (``cspine serve --no-worker``) and three
workers, as separate processes sharing the catalog and the store, several senders at
once; one worker is SIGKILLed mid-job and one receiver mid-series (then started again,
so that both receivers complete studies and deliver).

Afterwards every acknowledged instance is in the catalog and, intact, in the store;
every study is complete with exactly one DONE job per version; every recorded output
reached the loopback PACS exactly once. ``make test`` sends 8 studies from 4 senders;
``make reliability`` (``CSPINE_RELIABILITY_FULL=1``) sends 20.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pydicom
from pynetdicom import AE
from sqlalchemy import select

from ai.synthetic import StudySpec, generate_study, write_study
from config.digest import sha256_file
from storage import Catalog
from storage.models import Instance, Job, JobState, Output, Study, StudyState
from tests.conftest import free_port
from tests.dicom_node.pacs import LoopbackPACS
from tests.dicom_node.proc import Server
from tests.dicom_node.scu_tools import serves_no_requests
from tests.helpers import CT

FULL = os.environ.get("CSPINE_RELIABILITY_FULL") == "1"
STUDIES, SENDERS, WORKERS = (20, 4, 3) if FULL else (8, 4, 3)
KILL_RECEIVER_AFTER = 25
"""The second receiver is SIGKILLed once it has acknowledged this many instances (early:
no study is complete yet, so no delivery is in flight in it)."""


def _sender(
    index: int,
    studies: list[list[Path]],
    ports: list[int],
    acked: set[str],
    lock: threading.Lock,
    on_ack,  # type: ignore[no-untyped-def]
    errors: list[str],
) -> None:
    """Send each study over one association to receiver ``index % 2``; when that receiver
    goes away, resend what it did not acknowledge to the other (as a modality retries)."""
    prefer = index % 2
    for paths in studies:
        left = list(paths)
        for attempt in range(6):
            port = ports[(prefer + attempt) % 2]
            ae = AE(ae_title=f"SENDER{index}")
            ae.add_requested_context(CT, "1.2.840.10008.1.2.1")
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
            assoc = serves_no_requests(ae.associate("127.0.0.1", port, ae_title="CSPINE"))
            if not assoc.is_established:
                time.sleep(0.2)
                continue
            try:
                while left:
                    try:
                        rsp = assoc.send_c_store(left[0])
                    except Exception:
                        break
                    if rsp.get("Status") != 0:
                        break
                    uid = pydicom.dcmread(left[0], stop_before_pixels=True).SOPInstanceUID
                    with lock:
                        acked.add(str(uid))
                    on_ack(port)
                    left.pop(0)
            finally:
                if assoc.is_established:
                    assoc.release()
            if not left:
                break
        if left:
            errors.append(f"sender {index}: {len(left)} instances never acknowledged")


def _wait(condition, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_two_receivers_three_workers_one_postgresql_survive_sigkills(tmp_path, postgres_server):
    url = postgres_server.create_database()
    pacs = LoopbackPACS().start()
    store_dir = tmp_path / "shared-store"
    env = {
        "CSPINE_STORAGE__DATABASE_URL": url,
        "CSPINE_STORAGE__STORE_DIR": str(store_dir),
        "CSPINE_STORAGE__MIN_FREE_BYTES": "0",
        "CSPINE_COMPLETION__CHECK_INTERVAL_SECONDS": "0.5",
        "CSPINE_NODE__RECEIVERS": "1",  # one receiver process per host
    }
    ports = [free_port(), free_port()]
    receivers = [
        Server(
            tmp_path / f"host{i}",
            port,
            "--no-worker",
            "--stable-seconds",
            "4",
            "--destination",
            pacs.spec,
            env=env,
        )
        for i, port in enumerate(ports)
    ]
    workers: list[subprocess.Popen] = []
    catalog: Catalog | None = None
    try:
        for r in receivers:
            r.start()
        worker_settings = {
            "storage": {
                "data_dir": str(tmp_path / "workers"),
                "database_url": url,
                "store_dir": str(store_dir),
                "min_free_bytes": 0,
            },
            "worker": {"poll_seconds": 0.2},
        }
        for i in range(WORKERS):
            log = (tmp_path / f"worker{i}.log").open("ab")
            workers.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "tests.reliability.standin_worker",
                        json.dumps(worker_settings),
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, "PYTHONPATH": os.getcwd()},
                )
            )
        catalog = Catalog(url)

        studies = [
            write_study(
                generate_study(4000 + i, StudySpec.small(rows=64, cols=64, n_slices=40)),
                tmp_path / "studies" / str(i),
            )
            for i in range(STUDIES)
        ]
        acked: set[str] = set()
        lock = threading.Lock()
        counts: Counter[int] = Counter()
        errors: list[str] = []

        receiver_busy = threading.Event()

        def on_ack(port: int) -> None:
            with lock:
                counts[port] += 1
                if counts[ports[1]] >= KILL_RECEIVER_AFTER:
                    receiver_busy.set()

        threads = [
            threading.Thread(
                target=_sender,
                args=(i, studies[i::SENDERS], ports, acked, lock, on_ack, errors),
            )
            for i in range(SENDERS)
        ]
        for t in threads:
            t.start()

        # SIGKILL the second receiver mid-series (its senders go on to the other); it
        # comes back, as its supervisor would start it: its start-up repair runs while
        # the other receives, and from then on both complete studies and deliver
        assert receiver_busy.wait(300), "the second receiver got no instances"
        killed = receivers[1]
        killed.kill()
        assert killed.proc is not None and killed.proc.returncode == -signal.SIGKILL
        killed.start()

        # SIGKILL the first worker once it holds a job
        pid = workers[0].pid

        def first_worker_busy() -> bool:
            with catalog.read() as s:  # type: ignore[union-attr]
                running = s.scalars(select(Job.worker).where(Job.state == JobState.RUNNING))
                return any(w and w.endswith(f":{pid}") for w in running)

        _wait(first_worker_busy, 300, "the first worker to claim a job")
        os.kill(pid, signal.SIGKILL)
        assert workers[0].wait(10) == -signal.SIGKILL
        for t in threads:
            t.join(600)
        assert errors == []

        def all_done() -> bool:
            with catalog.read() as s:  # type: ignore[union-attr]
                studies_left = s.scalars(
                    select(Study.id).where(Study.state != StudyState.COMPLETE)
                ).all()
                busy = s.scalars(
                    select(Job.id).where(Job.state.in_([JobState.QUEUED, JobState.RUNNING]))
                ).all()
                n = len(s.scalars(select(Study.id)).all())
            return n == STUDIES and not studies_left and not busy

        _wait(all_done, 600, "every study complete and every job finished")
        with catalog.read() as s:
            outputs = {o.sop_instance_uid: o.job_id for o in s.scalars(select(Output))}
        _wait(lambda: len(pacs.received) >= len(outputs), 120, "every output delivered")
        time.sleep(2)  # a duplicate, were one on its way, would arrive now

        with catalog.read() as s:
            rows = {r.sop_instance_uid: r for r in s.scalars(select(Instance))}
            jobs = list(s.scalars(select(Job)))
            outputs = {o.sop_instance_uid: o.job_id for o in s.scalars(select(Output))}
        # every acknowledged instance: in the catalog, and intact in the store
        assert acked <= set(rows)
        for uid in acked:
            assert sha256_file(store_dir / rows[uid].file_path) == rows[uid].sha256
        # exactly one DONE job per study version; the killed worker's job was taken over
        per_version = Counter((j.study_id, j.version) for j in jobs if j.state is JobState.DONE)
        versions = {(j.study_id, j.version) for j in jobs if j.state is not JobState.SUPERSEDED}
        states = sorted((j.study_id, j.version, j.state.value, j.attempts) for j in jobs)
        assert set(per_version) == versions and set(per_version.values()) == {1}, states
        assert any(j.attempts >= 2 and j.state is JobState.DONE for j in jobs)
        assert {j.state for j in jobs} <= {JobState.DONE, JobState.SUPERSEDED}
        # each recorded output reached the PACS exactly once (no other object arrived)
        received = Counter(str(ds.SOPInstanceUID) for ds in pacs.received)
        assert set(received) == set(outputs) and set(received.values()) == {1}
    finally:
        for proc in workers:
            if proc.poll() is None:
                proc.terminate()
        for proc in workers:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        for r in receivers:
            r.stop()
        pacs.stop()
        if catalog is not None:
            catalog.dispose()
        postgres_server.drop_database(url)
