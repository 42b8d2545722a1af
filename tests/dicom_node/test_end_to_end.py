"""End to end on loopback: cspine serve with the demo models, results delivered to PACSes.

A study goes in by C-STORE (``cspine send`` and dcmtk ``storescu``); the SEG, SR and
summary image come out at a pynetdicom PACS and at a dcmtk ``storescp``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from ai.seg.train import dice_per_label
from ai.synthetic import StudySpec, generate_study, write_study
from dicom_node.writers import read_sr_result, segment_numbers
from storage import Catalog
from storage.jobs import latest_job
from storage.models import JobState
from tests.conftest import free_port
from tests.dicom_node.pacs import LoopbackPACS
from tests.dicom_node.proc import Server, cspine
from tests.helpers import STAGE2_READY

SEG, SR, SC = (
    "1.2.840.10008.5.1.4.1.1.66.4",
    "1.2.840.10008.5.1.4.1.1.88.34",
    ("1.2.840.10008.5.1.4.1.1.7"),
)


def _wait(
    predicate, timeout: float, what: str, server: Server | None = None, interval: float = 0.5
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    log = server.log()[-4000:] if server else ""
    raise AssertionError(f"timed out waiting for {what}\n{log}")


def _dciodvfy_errors(path: Path) -> list[str]:
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    return [line for line in (run.stdout + run.stderr).splitlines() if "Error" in line]


@pytest.fixture
def storescp(tmp_path):
    out = tmp_path / "storescp"
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen(
        ["storescp", "+xa", "-aet", "DCMTKPACS", "-od", str(out), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "TCP_NODELAY": "1"},
    )
    yield port, out
    proc.terminate()
    proc.wait(10)


def _delivered(show: str) -> dict[str, list[str]]:
    """``{destination: [output kinds SENT]}`` parsed from ``cspine show``."""
    out: dict[str, list[str]] = {}
    for kind, dest in re.findall(r"^\s+(seg|sr|summary) -> (\S+): SENT", show, re.M):
        out.setdefault(dest, []).append(kind)
    return out


@pytest.mark.slow
def test_study_in_results_out_at_two_pacs(tmp_path, storescp):
    scp_port, scp_dir = storescp
    pacs = LoopbackPACS().start()
    study = generate_study(
        5, StudySpec.small(fracture_rate=1.0, field_of_view="full", **STAGE2_READY)
    )
    files = write_study(study, tmp_path / "study")
    port = free_port()
    data = tmp_path / "var"
    server = Server(
        data,
        port,
        "--stable-seconds",
        "2",
        "--destination",
        pacs.spec,
        "--destination",
        f"DCMTKPACS@127.0.0.1:{scp_port}",
    ).start()
    try:
        sent = cspine("send", str(tmp_path / "study"), "--to", f"CSPINE@127.0.0.1:{port}")
        assert sent.returncode == 0, sent.stderr

        def all_sent() -> bool:
            status = cspine("status", "--data-dir", str(data)).stdout
            return "jobs: QUEUED 0, RUNNING 0, DONE 1" in status and "PENDING 0" in status

        _wait(all_sent, 300, "the job and its deliveries", server)
        results = cspine("results", "1", "--data-dir", str(data))
        show = cspine("show", "1", "--data-dir", str(data)).stdout
    finally:
        server.stop()
        pacs.stop()
    delivered = _delivered(show)
    kinds = delivered[pacs.spec]
    assert sorted(kinds) == ["seg", "sr", "summary"]
    assert sorted(delivered[f"DCMTKPACS@127.0.0.1:{scp_port}"]) == sorted(kinds)
    assert len(pacs.received) == len(kinds) and len(set(pacs.uids())) == len(kinds)
    classes = {"seg": SEG, "sr": SR, "summary": SC}
    by_class = {str(ds.SOPClassUID): ds for ds in pacs.received}
    assert sorted(by_class) == sorted(classes[k] for k in kinds)
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    for ds in pacs.received:  # results join the source study, in new series
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.PatientID == source.PatientID
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    # the dcmtk PACS got the same objects, and dciodvfy finds no error in them
    stored = sorted(scp_dir.iterdir())
    assert {pydicom.dcmread(p).SOPInstanceUID for p in stored} == set(pacs.uids())
    for path in stored:
        assert _dciodvfy_errors(path) == [], path
    # SR values equal `cspine results`, and both carry the demo label
    sr = read_sr_result(by_class[SR])
    assert results.returncode == 0, results.stderr
    assert "synthetic demo weights, not for clinical use" in results.stdout
    probabilities: dict[str, float] = {}
    for name in ("C1", "C2", "C3", "C4", "C5", "C6", "C7"):
        row = re.search(rf"^{name}\s+(yes|no)\s+(\S+)", results.stdout, re.M)
        assert row, results.stdout
        if row.group(1) == "yes":
            assert abs(float(row.group(2)) - sr[name]["probability"]) < 1e-3
            probabilities[name] = sr[name]["probability"]
        else:
            assert sr[name].get("probability") is None
    # the fractured vertebra of the synthetic truth gets the highest probability
    fractured = [n for n, f in study.vertebra_fractured.items() if f]
    assert fractured == ["C2"]
    assert max(probabilities, key=probabilities.__getitem__) == "C2", probabilities
    # the SEG reads back, references the source series and overlaps the synthetic truth
    seg = hd.seg.Segmentation.from_dataset(by_class[SEG])
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    numbers = segment_numbers(by_class[SEG])
    names = [n for n in ("C1", "C2", "C3", "C4", "C5", "C6", "C7") if n in numbers]
    assert names == ["C1", "C2", "C3", "C4", "C5", "C6", "C7"]
    labels = seg.get_pixels_by_source_instance(
        list(study.volume.source_sop_instance_uids),
        segment_numbers=[numbers[n] for n in names],
        combine_segments=True,
        relabel=True,
        assert_missing_frames_are_empty=True,
    )
    truth = np.where(study.labels <= 7, study.labels, 0)
    assert labels.shape == truth.shape
    dice = dice_per_label(labels, truth)
    assert np.mean(list(dice.values())) > 0.5, dice


@pytest.mark.slow
def test_storescu_in_worker_killed_mid_job_results_once(tmp_path):
    pacs = LoopbackPACS().start()
    study = generate_study(6, StudySpec.small(fracture_rate=1.0, field_of_view="full"))
    write_study(study, tmp_path / "study")
    port = free_port()
    data = tmp_path / "var"
    server = Server(data, port, "--stable-seconds", "1", "--destination", pacs.spec).start()
    try:
        run = subprocess.run(
            [
                "storescu",
                "-aec",
                "CSPINE",
                "+sd",
                "+r",
                "127.0.0.1",
                str(port),
                str(tmp_path / "study"),
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "TCP_NODELAY": "1"},
        )
        assert run.returncode == 0, run.stderr

        # The job runs for a second or two: the catalog is read directly every 20 ms (a
        # `cspine status` subprocess per poll takes about as long as the whole job).
        catalog = Catalog(f"sqlite:///{data / 'catalog.sqlite'}")

        def running_pid() -> int | None:
            job = latest_job(catalog, 1, [JobState.RUNNING])
            if job is None or not job.worker:
                return None
            return int(job.worker.rsplit(":", 1)[1])

        pid: list[int] = []
        _wait(
            lambda: (p := running_pid()) is not None and not pid.append(p),
            120,
            "a RUNNING job",
            server,
            interval=0.02,
        )
        catalog.dispose()
        os.kill(pid[0], signal.SIGKILL)  # the worker dies mid-job; serve restarts it

        def all_sent() -> bool:
            status = cspine("status", "--data-dir", str(data)).stdout
            return "RUNNING 0, DONE 1" in status and "PENDING 0" in status

        _wait(all_sent, 300, "the re-queued job and its deliveries", server)
        time.sleep(3)  # nothing more may arrive
        show = cspine("show", "1", "--data-dir", str(data)).stdout
    finally:
        server.stop()
        pacs.stop()
    kinds = _delivered(show)[pacs.spec]
    # each output reached the PACS exactly once: no partial or duplicate result
    assert len(pacs.received) == len(kinds) >= 2 and len(set(pacs.uids())) == len(kinds)
    assert "re-queued" in show and "DONE" in show
    assert "worker exited" in server.log()
