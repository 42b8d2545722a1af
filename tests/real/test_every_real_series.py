"""Every real CT file in the real-data folder, grouped as the node groups it, ends in a
delivered result: outputs or a NOT_PROCESSED SR with its reason, never a FAILED job.

The CT files (Modality CT, a CT storage SOP class, readable headers) are sent to
``cspine serve`` with the shipped models by ``cspine send``; what the receiver refuses
(bad UIDs, truncated pixels, syntaxes not accepted) is refused as
``tests/reliability/test_real_files.py`` lists. Every study the node accepted an instance
of must get a job that is not FAILED, and an SR must reach the loopback PACS for it.
"""

from __future__ import annotations

import re
import time

import pydicom
import pytest

from dicom_node.validate import CT_STORAGE_SOP_CLASSES
from tests.conftest import free_port
from tests.dicom_node.pacs import LoopbackPACS
from tests.dicom_node.proc import Server, cspine, wait_journal_empty
from tests.reliability.real_files import dicom_candidates

SR = "1.2.840.10008.5.1.4.1.1.88.34"


def _ct_files(root) -> list:
    out = []
    for rel in dicom_candidates(root):
        try:
            ds = pydicom.dcmread(root / rel, stop_before_pixels=True)
        except Exception:
            continue
        if ds.get("Modality") == "CT" and str(ds.get("SOPClassUID", "")) in (
            CT_STORAGE_SOP_CLASSES
        ):
            out.append(root / rel)
    return out


def _counts(status: str) -> dict[str, int]:
    line = next(line for line in status.splitlines() if line.startswith("jobs:"))
    return {state: int(n) for state, n in re.findall(r"([A-Z_]+) (\d+)", line)}


@pytest.mark.slow
def test_every_accepted_real_ct_study_gets_a_delivered_sr_and_no_job_fails(real_data, tmp_path):
    files = _ct_files(real_data)
    assert len(files) >= 40, len(files)
    pacs = LoopbackPACS().start()
    port = free_port()
    data = tmp_path / "var"
    server = Server(data, port, "--stable-seconds", "2", "--destination", pacs.spec).start()
    try:
        sent = cspine("send", *map(str, files), "--to", f"CSPINE@127.0.0.1:{port}")
        # some real files are refused by the receiver (that is their test's business)
        assert "sent" in sent.stdout + sent.stderr, sent.stdout + sent.stderr
        # the answers run ahead of the catalog (the ingest journal): list the studies
        # once every answered instance is cataloged
        wait_journal_empty(data, timeout=120)
        studies = cspine("studies", "--data-dir", str(data)).stdout
        sent_studies = {
            str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID) for f in files
        }
        accepted_studies = {uid for uid in sent_studies if uid in studies}
        # every accepted study's job ends and its outputs leave (each study completes on
        # its own stable window, so "nothing queued" alone is not the end)
        deadline = time.monotonic() + 400
        status = ""
        while time.monotonic() < deadline:
            status = cspine("status", "--data-dir", str(data)).stdout
            counts = _counts(status)
            ended = sum(counts.get(s, 0) for s in ("DONE", "NOT_PROCESSED", "FAILED"))
            busy = counts.get("QUEUED", 0) + counts.get("RUNNING", 0)
            if ended >= len(accepted_studies) and busy == 0 and "PENDING 0" in status:
                break
            time.sleep(1)
        else:
            raise AssertionError(f"jobs not finished:\n{status}\n{server.log()[-3000:]}")
        log = server.log()
    finally:
        server.stop()
        pacs.stop()
    counts = _counts(status)
    assert counts.get("FAILED", 0) == 0, status + log[-4000:]
    finished = counts.get("DONE", 0) + counts.get("NOT_PROCESSED", 0)
    assert finished >= len(accepted_studies) > 10, (finished, len(accepted_studies), status)
    sr_studies = {str(ds.StudyInstanceUID) for ds in pacs.received if str(ds.SOPClassUID) == SR}
    assert accepted_studies <= sr_studies, accepted_studies - sr_studies
    assert "Traceback" not in log
