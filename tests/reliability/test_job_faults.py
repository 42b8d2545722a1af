"""SIGKILL of a worker process during inference: the job is re-queued and completes
once, its outputs keep their SOP Instance UIDs, and each reaches the PACS once.

The end-to-end version with the real demo models and ``cspine serve`` restarting the
worker is ``test_storescu_in_worker_killed_mid_job_results_once`` in
``tests/dicom_node/test_end_to_end.py``; this one pins the kill inside ``pipeline.run``
with a stand-in pipeline, in seconds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import select

from dicom_node.delivery import deliver_due
from dicom_node.worker import Worker
from storage.models import Job, JobState, OutboxItem, Output
from tests.dicom_node.pacs import LoopbackPACS
from tests.reliability.outbox import complete_study, with_destinations
from tests.reliability.test_hostile_input import EmptyPipeline

# a worker process whose pipeline blocks: the test kills it there
WORKER = """
import json, sys, time
from config import load_settings
from dicom_node.receive import open_node_storage
from dicom_node.worker import Worker

class Stuck:
    def run(self, vol):
        print("INFERENCE", flush=True)
        time.sleep(120)

settings = load_settings(overrides=json.loads(sys.argv[1]), environ={})
catalog, store = open_node_storage(settings)
Worker(settings, catalog, store, pipeline_factory=Stuck).run_once()
"""


def test_sigkill_during_inference_job_completes_once(tmp_path):
    pacs = LoopbackPACS().start()
    settings = with_destinations(
        tmp_path,
        [{"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}],
        selection={"min_slices": 3, "min_coverage_mm": 0},
    )
    catalog, store = complete_study(settings, tmp_path / "series", 5)
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKER, json.dumps(settings.model_dump(mode="json"))],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "INFERENCE"  # inside pipeline.run
        with catalog.read() as s:
            job = s.scalars(select(Job)).one()
            assert job.state is JobState.RUNNING and job.worker.endswith(f":{proc.pid}")
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(10) == -9
    finally:
        if proc.poll() is None:
            proc.kill()
    try:
        # a new worker process: it re-queues the dead worker's job and runs it
        worker = Worker(settings, catalog, store, pipeline_factory=EmptyPipeline)
        assert worker.recover() == [job.id]
        assert worker.run_once() and not worker.run_once()
        assert deliver_due(settings, catalog, store) == 2  # SR and summary (nothing segmented)
        time.sleep(0.2)
    finally:
        pacs.stop()
    with catalog.read() as s:
        (job,) = s.scalars(select(Job))
        outputs = list(s.scalars(select(Output)))
        outbox = list(s.scalars(select(OutboxItem)))
    catalog.dispose()
    assert job.state is JobState.DONE and job.attempts == 2  # completed once, on retry
    assert sorted(o.kind for o in outputs) == ["sr", "summary"]
    assert len(outbox) == 2 and {i.state.value for i in outbox} == {"SENT"}
    assert sorted(pacs.uids()) == sorted(o.sop_instance_uid for o in outputs)


def _children(pid: int, marker: str = "") -> list[int]:
    """Child pids of ``pid`` from /proc (Linux) whose command line holds ``marker``."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and marker.encode() in cmdline:
            out.append(int(entry))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_sigkill_of_serve_takes_its_worker_down_and_a_restart_runs_one_worker(tmp_path):
    from tests.conftest import free_port
    from tests.dicom_node.proc import Server

    port = free_port()
    server = Server(tmp_path / "var", port).start()

    def children(marker: str) -> list[int]:
        assert server.proc is not None
        deadline = time.monotonic() + 30
        found: list[int] = []
        while time.monotonic() < deadline and not found:
            found = _children(server.proc.pid, marker)
            time.sleep(0.2)
        return found

    try:
        workers = children("worker")  # the worker, and the journal's applier beside it
        appliers = children("dicom_node.apply")
        assert len(workers) == 1 and len(appliers) == 1, server.log()[-2000:]
        server.kill()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(map(_alive, workers + appliers)):
            time.sleep(0.1)
        assert not _alive(workers[0]), "the worker outlived the killed node"
        assert not _alive(appliers[0]), "the applier outlived the killed node"
        server.start()
        again = children("worker")
        assert len(again) == 1 and workers[0] not in again
        assert len(children("dicom_node.apply")) == 1
    finally:
        server.stop()
