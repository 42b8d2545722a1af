"""Round trip with a real PACS: Orthanc sends a study to the node, the node sends results back.

Orthanc (Debian's ``orthanc`` package) runs on free loopback ports with its own
configuration: it knows the node as modality ``cspine`` and accepts C-STORE only from
declared modalities on their declared host. The node knows Orthanc as its destination
and, through an allow-list, accepts associations only from ORTHANC (and the PROBE
AE title the test harness uses to see that the node listens).
"""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from ai.synthetic import StudySpec, generate_study, write_study
from storage import Catalog
from storage.models import Job, JobState, OutboxItem, OutboxState, Output
from tests.conftest import free_port
from tests.dicom_node.proc import Server, cspine
from tests.helpers import STAGE2_READY
from tests.interop.orthanc import Orthanc

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
SR_3D = "1.2.840.10008.5.1.4.1.1.88.34"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def _wait(predicate, timeout: float, what: str, server: Server, orthanc: Orthanc) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(
        f"timed out waiting for {what}\n--- node ---\n{server.log()[-4000:]}"
        f"\n--- orthanc ---\n{orthanc.log()[-2000:]}"
    )


def _node_settled(catalog: Catalog) -> bool:
    """The node finished its job and has nothing left to deliver (sent or dead)."""
    with catalog.read() as session:
        jobs = session.scalars(select(Job.state)).all()
        pending = session.scalars(
            select(OutboxItem.id).where(OutboxItem.state == OutboxState.PENDING)
        ).all()
    busy = {JobState.QUEUED, JobState.RUNNING}
    return bool(jobs) and not busy & set(jobs) and not pending


def _site_config(path: Path) -> Path:
    path.write_text(
        "[node]\n"
        "allow_any_peer = false\n"
        "[[node.peers]]\n"
        'ae_title = "ORTHANC"\n'
        'host = "127.0.0.1"\n'
        "[[node.peers]]\n"
        'ae_title = "PROBE"\n'
        'host = "127.0.0.1"\n'
        "[storage]\n"
        "min_free_bytes = 0\n"
    )
    return path


@pytest.mark.slow
def test_orthanc_sends_study_and_receives_seg_sr_and_summary(tmp_path):
    study = generate_study(
        5, StudySpec.small(fracture_rate=1.0, field_of_view="full", **STAGE2_READY)
    )
    files = write_study(study, tmp_path / "study")
    node_port = free_port()
    data = tmp_path / "var"
    orthanc = Orthanc(tmp_path / "orthanc", {"cspine": ("CSPINE", "127.0.0.1", node_port)})
    orthanc.start()
    server = None
    try:
        # the study reaches the PACS over its REST API
        answers = [orthanc.upload(path) for path in files]
        assert {a["Status"] for a in answers} == {"Success"}
        (orthanc_study,) = {a["ParentStudy"] for a in answers}
        assert orthanc.get("/studies") == [orthanc_study]
        originals = {a["ID"] for a in answers}
        assert len(originals) == len(files)

        server = Server(
            data,
            node_port,
            "--config",
            str(_site_config(tmp_path / "site.toml")),
            "--stable-seconds",
            "2",
            "--destination",
            f"ORTHANC@127.0.0.1:{orthanc.dicom_port}",
        ).start()
        # Orthanc verifies the node (C-ECHO), then sends the study to it (C-STORE)
        assert orthanc.post("/modalities/cspine/echo", {}) == {}
        job = orthanc.post(
            "/modalities/cspine/store", {"Resources": [orthanc_study], "Synchronous": True}
        )
        assert job["InstancesCount"] == len(files) and job["FailedInstancesCount"] == 0, job

        catalog = Catalog(f"sqlite:///{data / 'catalog.sqlite'}")
        try:
            _wait(lambda: _node_settled(catalog), 240, "the node's job", server, orthanc)
        finally:
            catalog.dispose()
        time.sleep(1)  # Orthanc indexes what it acknowledged; nothing more may arrive
        results = cspine("results", "1", "--data-dir", str(data))
        show = cspine("show", "1", "--data-dir", str(data))
        status = cspine("status", "--data-dir", str(data))
        final = orthanc.get(f"/studies/{orthanc_study}/instances")
        studies = orthanc.get("/studies")
        new = [i for i in final if i["ID"] not in originals]
        tags = {i["ID"]: orthanc.get(f"/instances/{i['ID']}/simplified-tags") for i in new}
        parent = {i["ID"]: orthanc.get(f"/instances/{i['ID']}/study")["ID"] for i in new}
    finally:
        if server is not None:
            server.stop()
        orthanc.stop()

    # the results joined the original study: no new study, no new patient
    assert studies == [orthanc_study]
    assert len(final) == len(files) + 3
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    for instance in new:
        assert parent[instance["ID"]] == orthanc_study
        t = tags[instance["ID"]]
        assert t["StudyInstanceUID"] == source.StudyInstanceUID
        assert t["PatientID"] == source.PatientID
    # one SEG, one Comprehensive 3D SR, one Secondary Capture, each in its own new series
    assert sorted(t["SOPClassUID"] for t in tags.values()) == sorted(
        [SEG, SR_3D, SECONDARY_CAPTURE]
    )
    assert len({i["ParentSeries"] for i in new}) == 3
    assert not {i["ParentSeries"] for i in new} & {
        i["ParentSeries"] for i in final if i["ID"] in originals
    }

    # the count and the UIDs are what the node reports
    assert results.returncode == 0, results.stderr
    assert "DONE" in results.stdout
    assert "synthetic demo weights, not for clinical use" in results.stdout
    dest = f"ORTHANC@127.0.0.1:{orthanc.dicom_port}"
    sent_lines = [line for line in show.stdout.splitlines() if f"-> {dest}: SENT" in line]
    assert len(sent_lines) == len(new) == 3, show.stdout
    assert "outbox: PENDING 0, SENT 3, DEAD 0" in status.stdout
    catalog = Catalog(f"sqlite:///{data / 'catalog.sqlite'}")
    try:
        with catalog.read() as session:
            outputs = session.scalars(select(Output)).all()
            node_uids = {o.sop_instance_uid: o.sop_class_uid for o in outputs}
    finally:
        catalog.dispose()
    assert node_uids == {t["SOPInstanceUID"]: t["SOPClassUID"] for t in tags.values()}
