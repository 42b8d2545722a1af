"""Real CT through a running node: every series the receiver accepts ends in a delivered,
truthful result.

``cspine serve`` runs as a subprocess with the shipped models and its own worker; the
real series goes in by C-STORE over a real association, and the results come out at a
pynetdicom PACS on loopback.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pydicom
import pytest

from dicom_node.writers import read_sr_result
from tests.conftest import free_port
from tests.dicom_node.pacs import LoopbackPACS
from tests.dicom_node.proc import Server, cspine

SR = "1.2.840.10008.5.1.4.1.1.88.34"
GE_HEAD_TILT = Path("neurolabusc_dcm_qa_ct") / "GE_HiSpeed_head_gantry_tilt"
"""28 axial slices of a GE HiSpeed head CT, 18.5 degree gantry tilt, 4 mm slices; the
headers have no Patient's Birth Date or Sex and empty study dates, accession number and
Study ID."""
BELOW_C2 = ("C3", "C4", "C5", "C6", "C7")


def _wait(predicate, timeout: float, what: str, server: Server) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}\n{server.log()[-4000:]}")


def _job_counts(status: str) -> dict[str, int]:
    line = next(line for line in status.splitlines() if line.startswith("jobs:"))
    return {state: int(n) for state, n in re.findall(r"([A-Z_]+) (\d+)", line)}


def _dciodvfy_errors(path: Path) -> list[str]:
    run = subprocess.run(
        ["dciodvfy", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    return [line for line in (run.stdout + run.stderr).splitlines() if "Error" in line]


@pytest.mark.slow
@pytest.mark.parametrize(
    "env",
    [
        pytest.param({}, id="default-settings"),
        # series selection refuses the 19 degree tilt by default; let the series through
        # so that it reaches the pipeline and, if the pipeline answers, the SEG, SR and
        # summary writers
        pytest.param({"CSPINE_SELECTION__MAX_OBLIQUITY_DEGREES": "25"}, id="tilt-accepted"),
    ],
)
def test_ge_head_ct_with_gantry_tilt_gets_a_delivered_truthful_result(real_data, tmp_path, env):
    folder = real_data / GE_HEAD_TILT
    files = sorted(folder.glob("*.dcm"))
    assert len(files) == 28
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert "PatientBirthDate" not in source and "PatientSex" not in source  # the known case
    source_errors = set(_dciodvfy_errors(files[0]))
    pacs = LoopbackPACS().start()
    port = free_port()
    data = tmp_path / "var"
    server = Server(
        data, port, "--stable-seconds", "2", "--destination", pacs.spec, env=env
    ).start()
    try:
        sent = cspine("send", str(folder), "--to", f"CSPINE@127.0.0.1:{port}")
        assert sent.returncode == 0, sent.stdout + sent.stderr

        def finished() -> bool:
            status = cspine("status", "--data-dir", str(data)).stdout
            counts = _job_counts(status)
            final = sum(counts.get(s, 0) for s in ("DONE", "NOT_PROCESSED", "FAILED"))
            return (
                final >= 1
                and counts.get("QUEUED", 0) + counts.get("RUNNING", 0) == 0
                and ("PENDING 0" in status)
            )

        _wait(finished, 480, "the job and its deliveries", server)
        status = cspine("status", "--data-dir", str(data)).stdout
        show = cspine("show", "1", "--data-dir", str(data)).stdout
    finally:
        server.stop()
        pacs.stop()
    log = server.log()
    counts = _job_counts(status)
    assert counts.get("FAILED", 0) == 0, status + show + log[-4000:]
    assert counts.get("DONE", 0) + counts.get("NOT_PROCESSED", 0) == 1, status
    assert "job failed" not in log
    assert str(source.PatientID) not in log  # no patient identifier in the node's log

    # a result reached the PACS: at least an SR, in the source study, valid
    srs = [ds for ds in pacs.received if str(ds.SOPClassUID) == SR]
    assert srs, f"no SR delivered\n{show}"
    for index, ds in enumerate(pacs.received):
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID
        assert ds.PatientID == source.PatientID
        assert ds.PatientBirthDate == "" and ds.PatientSex == ""  # Type 2: present, empty
        path = tmp_path / f"delivered-{index}.dcm"
        ds.save_as(path, enforce_file_format=True)
        # no error of our own: the source's de-identification flag (Patient Identity
        # Removed YES with an empty De-identification Method) is copied as it is
        new_errors = set(_dciodvfy_errors(path)) - source_errors
        assert new_errors == set(), (str(ds.SOPClassUID), new_errors)

    # truthful: a head CT has no vertebra below C2; none may be reported with a probability
    for ds in srs:
        values = read_sr_result(ds)
        if "study not processed" in values:
            verdict = values["study not processed"]
            assert verdict["evaluation"] == "not assessed"
            assert verdict["reason"], verdict  # NOT_PROCESSED says why
            assert not verdict["reason"].startswith("internal error"), verdict
            continue
        for name in BELOW_C2:
            found = values.get(name, {})
            assert found.get("probability") is None, (name, found)
            assert found.get("evaluation") in (None, "not assessed"), (name, found)


@pytest.mark.filterwarnings("ignore:.*(unlikely to represent|Retired Person Name).*:UserWarning")
def test_all_writers_accept_the_ge_head_headers(real_data, tmp_path):
    """SEG, SR, summary image and not-processed SR from the GE headers (no Patient's Birth
    Date or Sex, empty dates and IDs), with a stand-in result: what the worker writes once
    a series like this one is processed. No dciodvfy error the source does not have."""
    import numpy as np
    from pydicom.uid import generate_uid

    from ai.types import VERTEBRAE, ModelIdentity, PipelineResult, VertebraResult
    from dicom_node.writers import write_not_processed_sr, write_seg, write_sr, write_summary

    files = sorted((real_data / GE_HEAD_TILT).glob("*.dcm"))
    sources = [pydicom.dcmread(f) for f in files]
    orientation = np.asarray(sources[0].ImageOrientationPatient, float)
    normal = np.cross(orientation[:3], orientation[3:])
    sources.sort(key=lambda ds: float(np.asarray(ds.ImagePositionPatient, float) @ normal))
    rows, cols = int(sources[0].Rows), int(sources[0].Columns)
    hu = np.stack(
        [ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in sources]
    ).astype(np.int16)
    spacing = [float(v) for v in sources[0].PixelSpacing]
    affine = np.eye(4)
    affine[:3, 0] = np.subtract(sources[1].ImagePositionPatient, sources[0].ImagePositionPatient)
    affine[:3, 1] = orientation[3:] * spacing[0]
    affine[:3, 2] = orientation[:3] * spacing[1]
    affine[:3, 3] = sources[0].ImagePositionPatient
    label_map = np.zeros((len(sources), rows, cols), np.uint8)
    label_map[0:2, 300:340, 230:290] = 2
    label_map[2:4, 300:340, 230:290] = 1
    verdicts = [
        VertebraResult(n, True, True, 0.1)
        if n in ("C1", "C2")
        else VertebraResult(n, False, False, None, "not in the field of view", "not_in_fov")
        for n in VERTEBRAE
    ]
    model = ModelIdentity("stand-in", "0", "0" * 64, "test stand-in", demo=True)
    result = PipelineResult(label_map, verdicts, 0.1, [model])

    def ids(what: str, number: int) -> dict[str, object]:
        return {
            "series_instance_uid": generate_uid(entropy_srcs=["ge", what, "series"]),
            "sop_instance_uid": generate_uid(entropy_srcs=["ge", what]),
            "series_number": number,
            "software_version": "0.1.0",
        }

    seg = write_seg(sources, result, **ids("seg", 9001))
    outputs = {
        "seg": seg,
        "sr": write_sr(sources, seg, result, threshold=0.5, **ids("sr", 9002)),
        "summary": write_summary(
            sources, hu, affine, result, threshold=0.5, **ids("summary", 9003)
        ),
        "not-processed": write_not_processed_sr(
            sources[:1], "internal error (job 1)", **ids("np", 9002)
        ),
    }
    source_errors = set(_dciodvfy_errors(files[0]))
    for name, ds in outputs.items():
        path = tmp_path / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert set(_dciodvfy_errors(path)) - source_errors == set(), name
        back = pydicom.dcmread(path)
        assert back.PatientID == sources[0].PatientID
        assert back.PatientBirthDate == "" and back.PatientSex == "", name
        assert back.StudyDate == "" and back.AccessionNumber == "", name
    values = read_sr_result(pydicom.dcmread(tmp_path / "sr.dcm"))
    assert [n for n in BELOW_C2 if values[n]["probability"] is not None] == []
