"""Turnaround and memory: last instance acknowledged -> last output acknowledged by a PACS.

``python -m tests.bench.turnaround [SLICES ...]`` sends a synthetic 512x512 study of each
size with dcmtk storescu to a fresh ``cspine serve`` (demo models; on the CPU, and on
CUDA too where ``torch.cuda.is_available()``) whose destination is a loopback pynetdicom
PACS, and prints the stage breakdown (stable window, queue, selection, load/decode,
stage 1, stage 2, writing, sending), the total excluding the stable window, and the peak
resident set size (``VmHWM`` from ``/proc``) of the receiver and of its worker child.

:func:`rss_series` ingests the same series N times with new Study/Series/SOP Instance
UIDs into one node and reads the receiver's and the worker's resident set size after
each study's outputs were delivered.

Environment: ``CSPINE_BENCH_STABLE`` (stable window, default 2 s), ``CSPINE_BENCH_TMP``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from tests.bench.ingest import DCMTK_ENV, TMP, free_port, wait_port
from tests.bench.procmem import NodeMemory
from tests.dicom_node.pacs import LoopbackPACS

STABLE = float(os.environ.get("CSPINE_BENCH_STABLE", "2"))
OUTPUTS_PER_STUDY = 3  # SEG, Comprehensive 3D SR, Secondary Capture summary
STAGES = (
    "wait_for_stability",
    "queue",
    "select",
    "load",
    "stage1",
    "gate",
    "stage2",
    "write",
    "send",
)


class TimedPACS(LoopbackPACS):
    """A loopback PACS that records when each instance was acknowledged (monotonic s)."""

    def __init__(self) -> None:
        super().__init__()
        self.arrivals: list[float] = []

    def _store(self, event):  # type: ignore[no-untyped-def]
        status = super()._store(event)
        with self._lock:
            self.arrivals.append(time.monotonic())
            self.received.clear()  # keep the bench process small over many studies
        return status


def cuda_device() -> str | None:
    """Name of the CUDA device torch sees, or None."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def write_study(folder: Path, slices: int, seed: int) -> Path:
    """Write one synthetic 512x512 bone-kernel series (explicit VR LE) into ``folder``."""
    from ai.synthetic import StudySpec, generate_study, write_series

    study = generate_study(seed, StudySpec(n_slices=slices, fracture_rate=1.0))
    write_series(study, folder, "explicit")
    return folder


def copy_with_new_uids(src: Path, dst: Path) -> Path:
    """Copy a series with fresh Study, Series and SOP Instance UIDs (a new study)."""
    dst.mkdir(parents=True)
    study_uid, series_uid = generate_uid(), generate_uid()
    for path in sorted(src.iterdir()):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(dst / path.name, enforce_file_format=True)
    return dst


class Node:
    """``cspine serve`` (receiver + worker) with a timed loopback PACS as destination."""

    def __init__(self, data: Path, device: str) -> None:
        self.data = data
        self.device = device
        self.port = free_port()
        self.pacs = TimedPACS()
        self.not_processed: str | None = None
        self.proc: subprocess.Popen | None = None
        self.memory: NodeMemory | None = None
        self.log_path = data.parent / f"{data.name}.log"

    def start(self, timeout: float = 300) -> Node:
        """Start the PACS and the node; wait until the worker has loaded its models."""
        self.pacs.start()
        self.data.mkdir(parents=True)
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dicom_node",
                "serve",
                "--data-dir",
                str(self.data),
                "--port",
                str(self.port),
                "--stable-seconds",
                str(STABLE),
                "--destination",
                self.pacs.spec,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**DCMTK_ENV, "CSPINE_MODELS__DEVICE": self.device},
        )
        log.close()
        self.memory = NodeMemory(self.proc.pid).start()
        try:
            wait_port(self.port)
            deadline = time.monotonic() + timeout
            while "worker ready" not in self.log():
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"worker never became ready:\n{self.log()[-3000:]}")
                time.sleep(0.2)
        except BaseException:
            self.stop()
            raise
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def send(self, folder: Path) -> tuple[float, float, float]:
        """storescu the folder; returns (monotonic start, monotonic last ack, wall last ack)."""
        t0 = time.monotonic()
        subprocess.run(
            ["storescu", "-aec", "CSPINE", "+sd", "127.0.0.1", str(self.port), str(folder)],
            check=True,
            env=DCMTK_ENV,
            capture_output=True,
        )
        return t0, time.monotonic(), time.time()

    def wait_outputs(
        self, total: int, timeout: float = 1800, *, not_processed_ok: bool = False
    ) -> float:
        """Wait until the PACS acknowledged ``total`` outputs; returns the last arrival.

        With ``not_processed_ok``, a job the node ended NOT_PROCESSED (the gate found no
        plausible cervical spine) ends the wait once its one output, the not-processed
        SR, has arrived; its reason is kept in :attr:`not_processed`.
        """
        deadline = time.monotonic() + timeout
        next_check = 0.0
        while len(self.pacs.arrivals) < total:
            if time.monotonic() > deadline or (self.proc and self.proc.poll() is not None):
                raise RuntimeError(
                    f"{len(self.pacs.arrivals)} of {total} outputs arrived:\n{self.log()[-3000:]}"
                )
            if time.monotonic() > next_check:
                next_check = time.monotonic() + 0.5
                failed = self.failed_jobs()
                if failed and not_processed_ok and all(f[1] == "NOT_PROCESSED" for f in failed):
                    if self.pacs.arrivals:
                        self.not_processed = str(failed[0][2])
                        break
                elif failed:
                    raise RuntimeError(f"the node did not process the study: {failed}")
            time.sleep(0.05)
        return max(self.pacs.arrivals)

    def failed_jobs(self) -> list[tuple[int, str, str]]:
        """Jobs that ended NOT_PROCESSED or FAILED: ``(id, state, reason)``."""
        path = self.data / "catalog.sqlite"
        if not path.exists():
            return []
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            return con.execute(
                "select id, state, reason from jobs where state in ('NOT_PROCESSED', 'FAILED')"
            ).fetchall()
        except sqlite3.OperationalError:  # tables not created yet, or busy
            return []
        finally:
            con.close()

    def stop(self) -> None:
        if self.memory is not None:
            self.memory.stop()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.pacs.stop()


def _stage_times(data: Path, wall_last_ack: float) -> dict[str, float]:
    """Stage seconds of the last job, from the catalog's events and the job's timings."""
    con = sqlite3.connect(data / "catalog.sqlite")
    try:
        job_id, result_json = con.execute(
            "select id, result_json from jobs order by id desc"
        ).fetchone()
        timings = json.loads(result_json)["timings"]

        def at(sql: str) -> float:
            text = con.execute(sql, (job_id,)).fetchone()[0]
            return dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC).timestamp()

        queued = at("select min(at) from job_events where job_id=? and state='QUEUED'")
        running = at("select max(at) from job_events where job_id=? and state='RUNNING'")
        done = at(
            "select max(at) from job_events where job_id=? and state in ('DONE', 'NOT_PROCESSED')"
        )
        sent = at(
            "select max(sent_at) from outbox o join outputs u on o.output_id=u.id where u.job_id=?"
        )
    finally:
        con.close()
    return {
        "wait_for_stability_s": queued - wall_last_ack,
        "queue_s": running - queued,
        **{f"{k}_s": float(v) for k, v in timings.items()},
        "send_s": sent - done,
    }


def run(slices: int, work: Path, device: str = "cpu") -> dict[str, float | str]:
    """One study of ``slices`` slices through a fresh node on ``device``."""
    folder = write_study(work / f"study{slices}", slices, 300 + slices)
    data = work / f"var{slices}-{device}"
    node = Node(data, device).start()
    try:
        t0, t_last_ack, wall_last_ack = node.send(folder)
        t_done = node.wait_outputs(OUTPUTS_PER_STUDY, not_processed_ok=True)
        assert node.memory is not None
        node.memory.sample()
    finally:
        node.stop()
    assert node.memory is not None
    stages = _stage_times(data, wall_last_ack)
    turnaround = t_done - t_last_ack
    row: dict[str, float | str] = {
        "slices": slices,
        "device": device,
        "receive_s": t_last_ack - t0,
        "turnaround_s": turnaround,
        **stages,
        "total_excl_stable_s": turnaround - stages["wait_for_stability_s"],
        "receiver_peak_mb": node.memory.receiver_peak_mb,
        "worker_peak_mb": node.memory.worker_peak_mb,
        "worker_restarts": max(0, len(node.memory.worker_pids) - 1),
    }
    if node.not_processed is not None:
        row["not_processed"] = node.not_processed
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(data, ignore_errors=True)
    return row


def rss_series(studies: int, slices: int, work: Path) -> dict[str, object]:
    """Receiver and worker RSS (MB) at start and after each of ``studies`` studies."""
    base = write_study(work / "rss-base", slices, 4242)
    node = Node(work / "rss-var", "cpu").start()
    after: list[dict[str, float]] = []
    try:
        assert node.memory is not None
        time.sleep(1)
        start = node.memory.sample()
        for i in range(studies):
            folder = copy_with_new_uids(base, work / f"rss-{i}")
            node.send(folder)
            node.wait_outputs(OUTPUTS_PER_STUDY * (i + 1))
            time.sleep(1.5)  # the delivery loop marks the outbox after the last ack
            after.append(node.memory.sample())
            shutil.rmtree(folder, ignore_errors=True)
        peaks = {
            "receiver_peak_mb": node.memory.receiver_peak_mb,
            "worker_peak_mb": node.memory.worker_peak_mb,
        }
    finally:
        node.stop()
        shutil.rmtree(base, ignore_errors=True)
    shutil.rmtree(work / "rss-var", ignore_errors=True)
    return {"slices": slices, "studies": studies, "start": start, "after": after, **peaks}


def _print(row: dict) -> None:
    print(
        json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}),
        flush=True,
    )


def main(argv: list[str], devices: list[str] | None = None) -> list[dict[str, float | str]]:
    """Run each size on each device (CPU, plus CUDA when available); print one JSON per run."""
    sizes = [int(a) for a in argv] or [300]
    if devices is None:
        devices = ["cpu"] + (["cuda"] if cuda_device() else [])
    rows = []
    with tempfile.TemporaryDirectory(prefix="cspine-turnaround-", dir=TMP) as tmp:
        for device in devices:
            for n in sizes:
                row = run(n, Path(tmp), device)
                rows.append(row)
                _print(row)
    return rows


def main_rss(studies: int, slices: int) -> dict[str, object]:
    """:func:`rss_series` in a temporary folder; prints the result as JSON."""
    with tempfile.TemporaryDirectory(prefix="cspine-rss-", dir=TMP) as tmp:
        result = rss_series(studies, slices, Path(tmp))
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
