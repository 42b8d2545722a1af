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

from ai.synthetic import StudySpec, generate_study, write_study
from dicom_node.writers import read_sr_result, segment_numbers
from tests.conftest import free_port
from tests.dicom_node.pacs import LoopbackPACS
from tests.dicom_node.proc import Server, cspine

SEG, SR, SC = (
    "1.2.840.10008.5.1.4.1.1.66.4",
    "1.2.840.10008.5.1.4.1.1.88.34",
    ("1.2.840.10008.5.1.4.1.1.7"),
)


def _wait(predicate, timeout: float, what: str, server: Server | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    log = server.log()[-4000:] if server else ""
    raise AssertionError(f"timed out waiting for {what}\n{log}")


def _dciodvfy_errors(path: Path) -> list[str]:
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    return [line for line in (run.stdout + run.stderr).splitlines() if "Error" in line]


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(1, float(a.sum() + b.sum()))


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


@pytest.mark.slow
def test_study_in_results_out_at_two_pacs(tmp_path, storescp):
    scp_port, scp_dir = storescp
    pacs = LoopbackPACS().start()
    study = generate_study(5, StudySpec.small(fracture_rate=1.0, field_of_view="full"))
    files = write_study(study, tmp_path / "study")
    port = free_port()
    server = Server(
        tmp_path / "var",
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
        _wait(lambda: len(pacs.received) >= 3, 300, "3 outputs at the PACS", server)
        _wait(lambda: len(list(scp_dir.iterdir())) >= 3, 60, "3 outputs at storescp", server)
        results = cspine("results", "1", "--data-dir", str(tmp_path / "var"))
        status = cspine("status", "--data-dir", str(tmp_path / "var"))
    finally:
        server.stop()
        pacs.stop()
    assert len(pacs.received) == 3 and len(set(pacs.uids())) == 3
    by_class = {str(ds.SOPClassUID): ds for ds in pacs.received}
    assert sorted(by_class) == sorted([SEG, SR, SC])
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    for ds in pacs.received:
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.PatientID == source.PatientID
    # the dcmtk PACS got the same three objects, and dciodvfy finds no error in them
    stored = sorted(scp_dir.iterdir())
    assert {pydicom.dcmread(p).SOPInstanceUID for p in stored} == set(pacs.uids())
    for path in stored:
        assert _dciodvfy_errors(path) == [], path
    # SR values equal `cspine results`
    sr = read_sr_result(by_class[SR])
    assert results.returncode == 0, results.stderr
    for name in ("C1", "C2", "C3", "C4", "C5", "C6", "C7"):
        row = re.search(rf"^{name}\s+(yes|no)\s+(\S+)", results.stdout, re.M)
        assert row, results.stdout
        if row.group(1) == "yes":
            assert abs(float(row.group(2)) - sr[name]["probability"]) < 1e-3
    assert "synthetic demo weights, not for clinical use" in results.stdout
    assert "outbox: PENDING 0, SENT 6, DEAD 0" in status.stdout
    # SEG segments overlap the synthetic truth on the source grid
    seg = hd.seg.Segmentation.from_dataset(by_class[SEG])
    numbers = segment_numbers(by_class[SEG])
    uids = [str(u) for u in study.volume.source_sop_instance_uids]
    for name, number in numbers.items():
        mask = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=uids, segment_numbers=[number], combine_segments=False
        )[..., 0].astype(bool)
        truth = study.labels == ("C1", "C2", "C3", "C4", "C5", "C6", "C7").index(name) + 1
        assert _dice(mask, truth) > 0.7, name
    # the fractured vertebra has the highest probability
    fractured = [v for v, f in study.vertebra_fractured.items() if f]
    assessed = {
        k: v["probability"]
        for k, v in sr.items()
        if k.startswith("C") and v.get("probability") is not None
    }
    top = max(assessed, key=assessed.get)
    assert top in fractured, (assessed, fractured)


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

        def running_pid() -> int | None:
            out = cspine("status", "--data-dir", str(data)).stdout
            m = re.search(r"running: job \d+ .* on [^:]+:(\d+)", out)
            return int(m.group(1)) if m else None

        pid: list[int] = []
        _wait(
            lambda: (p := running_pid()) is not None and not pid.append(p),
            120,
            "a RUNNING job",
            server,
        )
        os.kill(pid[0], signal.SIGKILL)  # the worker dies mid-job; serve restarts it
        _wait(lambda: len(pacs.received) >= 3, 300, "outputs after the worker was killed", server)
        time.sleep(3)  # nothing more may arrive
        show = cspine("show", "1", "--data-dir", str(data)).stdout
    finally:
        server.stop()
        pacs.stop()
    assert len(pacs.received) == 3 and len(set(pacs.uids())) == 3
    assert "re-queued" in show and "DONE" in show
    assert "worker exited" in server.log()
