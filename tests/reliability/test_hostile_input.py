"""Hostile and broken input: each case gets its status or outcome, with the reason in
the catalog or the response, and the node keeps serving another peer afterwards.
"""

from __future__ import annotations

import json
import math
import tracemalloc
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE, _config
from sqlalchemy import select

from ai.types import VERTEBRAE, ModelIdentity, PipelineResult, VertebraResult
from ai.volume import load_series
from dicom_node.worker import Worker
from storage.catalog import mark_complete, receiving_studies
from storage.models import Instance, Job, JobState, Output, QuarantinedInstance, Study
from tests.conftest import free_port
from tests.dicom_node.proc import Server, echo_ok
from tests.dicom_node.scu_tools import chunked_send, serves_no_requests, store_file
from tests.helpers import CT, ct_slice, dataset_bytes, lenient_writing
from tests.reliability.test_receive_faults import (
    assert_intact,
    assert_other_peer_served,
    latest_refusal,
)

REAL_BAD_JPEG = "pylibjpeg-data/JPEGLossless_1s_1f_i_16_16_bad.dcm"
REAL_GOOD_JPEG = (
    "cornerstonejs_cornerstone3D/CTImage.dcm_JPEGProcess14TransferSyntax_1.2.840.10008.1.2.4.57.dcm"
)
GE_TILT = "neurolabusc_dcm_qa_ct/GE_HiSpeed_head_gantry_tilt"


def _save(ds: pydicom.Dataset, path: Path) -> Path:
    with lenient_writing():
        ds.preamble = b"\0" * 128
        ds.save_as(path, enforce_file_format=False)  # keep crafted values as they are
    return path


def _with_uid(keyword: str, value: str):
    def mutate(ds: pydicom.Dataset) -> None:
        setattr(ds, keyword, value)
        if keyword == "SOPInstanceUID":
            ds.file_meta.MediaStorageSOPInstanceUID = value

    return mutate


HOSTILE_UIDS = {
    "sop-dot-dot-slash": ("SOPInstanceUID", "1.2.3/../../../tmp/evil"),
    "sop-absolute-path": ("SOPInstanceUID", "/etc/cron.d/evil"),
    "sop-embedded-nul": ("SOPInstanceUID", "1.2.3\0.4"),
    "sop-shell": ("SOPInstanceUID", "1.2;rm -rf ."),
    "study-dot-dot": ("StudyInstanceUID", "../1.2.3"),
    "study-65-chars": ("StudyInstanceUID", "1." + "3" * 63),
    "series-slash": ("SeriesInstanceUID", "1.2/3"),
    "series-embedded-nul": ("SeriesInstanceUID", "1.2\0.3"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_UIDS))
def test_hostile_uid_refused_a900_and_nothing_written(module_node, tmp_path, case):
    node = module_node
    keyword, value = HOSTILE_UIDS[case]
    ds = ct_slice(generate_uid(), generate_uid(), 0)
    _with_uid(keyword, value)(ds)
    before = set(Path("/tmp").iterdir())
    rsp = store_file(node.port, _save(ds, tmp_path / "bad.dcm"))
    assert rsp is not None and rsp.Status == 0xA900
    assert f"{keyword} is not a valid UID" in rsp.ErrorComment
    refusal = latest_refusal(node.receiver)  # the reason is kept in the catalog
    assert refusal is not None and refusal.status == 0xA900
    assert refusal.reason == f"{keyword} is not a valid UID" and refusal.calling_ae == "TESTSCU"
    # a hostile UID never reaches the catalog; a valid one is kept to find the sender's copy
    assert refusal.sop_instance_uid == (None if keyword == "SOPInstanceUID" else ds.SOPInstanceUID)
    assert_intact(node, 0)
    assert not Path("/tmp/evil").exists() and not Path("/etc/cron.d/evil").exists()
    assert {p for p in set(Path("/tmp").iterdir()) - before if "evil" in p.name} == set()
    assert_other_peer_served(node.port)


def test_65_char_affected_sop_uid_aborts_the_association_and_stores_nothing(tmp_path):
    """pynetdicom refuses to decode a C-STORE-RQ whose Affected SOP Instance UID has more
    than 64 characters: the node aborts that association (A-P-ABORT), keeps nothing, and
    goes on serving. The sender here skips its own UID check, as a hostile peer would.
    """
    ds = ct_slice(generate_uid(), generate_uid(), 0)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1." + "2" * 63
    path = _save(ds, tmp_path / "long.dcm")
    data_dir, port = tmp_path / "var", free_port()
    server = Server(data_dir, port, "--no-worker").start()
    strict = _config.VALIDATORS["UI"]
    _config.VALIDATORS["UI"] = lambda value: (True, "")  # only this (client) process
    try:
        rsp = store_file(port, path)
    finally:
        _config.VALIDATORS["UI"] = strict
    try:
        assert rsp is None  # no response: the association was aborted
        assert echo_ok(port)  # another peer is still served
    finally:
        server.stop()
    log = server.log()
    assert "association aborted calling_ae=TESTSCU" in log
    assert "partial transfer discarded" in log
    assert not list((data_dir / "store" / "instances").rglob("*.dcm"))
    assert not list((data_dir / "store" / "tmp").iterdir())


def test_same_uid_other_content_quarantined_other_study_refused(node, tmp_path):
    ds = ct_slice(generate_uid(), generate_uid(), 0)
    original = _save(ds, tmp_path / "a.dcm")
    assert store_file(node.port, original).Status == 0
    ds.PixelData = bytes(len(ds.PixelData))  # same UID, other content
    assert store_file(node.port, _save(ds, tmp_path / "b.dcm")).Status == 0
    ds.StudyInstanceUID = generate_uid()  # same UID, another study
    rsp = store_file(node.port, _save(ds, tmp_path / "c.dcm"))
    assert rsp.Status == 0xA900 and "SOP Instance UID already stored" in rsp.ErrorComment
    refusal = latest_refusal(node.receiver)
    assert refusal.sop_instance_uid == ds.SOPInstanceUID and "another series" in refusal.reason
    with node.receiver.catalog.read() as s:
        (row,) = s.scalars(select(Instance))
        (q,) = s.scalars(select(QuarantinedInstance))
        (study,) = s.scalars(select(Study))
        events = [(e.kind, e.detail) for e in study.events]
    assert dataset_bytes(node.store_root / row.file_path) == dataset_bytes(original)
    assert study.flagged and "re-sent with different content" in study.flag_reason
    assert q.sha256 != row.sha256 and ("quarantine" in [k for k, _ in events])
    assert_other_peer_served(node.port)


def test_declared_65535x65535x10000_refused_before_any_allocation(node, tmp_path):
    ds = ct_slice(generate_uid(), generate_uid(), 0)  # 32x32 pixels actually sent
    ds.Rows = ds.Columns = 65535
    ds.NumberOfFrames = 10000
    path = _save(ds, tmp_path / "huge.dcm")
    tracemalloc.start()
    try:
        rsp = store_file(node.port, path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rsp.Status == 0xA700 and "65535x65535x10000 exceeds the pixel limit" in rsp.ErrorComment
    assert peak < 64 * 1024**2  # 85 TB declared; nothing near it was allocated
    refusal = latest_refusal(node.receiver)
    assert refusal.status == 0xA700 and "exceeds the pixel limit" in refusal.reason
    assert_intact(node, 0)
    assert_other_peer_served(node.port)


# -- the worker's view of received data: garbage pixels and irregular geometry --------


class EmptyPipeline:
    """A stand-in pipeline: no vertebra found, so the job's mechanics are what is tested."""

    def __init__(self) -> None:
        self.volumes: list = []

    def run(self, vol) -> PipelineResult:
        self.volumes.append(vol)
        verdicts = [
            VertebraResult(v, False, False, None, "not in field of view") for v in VERTEBRAE
        ]
        model = ModelIdentity("stand-in", "0", "0" * 64, "test stand-in", demo=True)
        return PipelineResult(np.zeros(vol.hu.shape, np.uint8), verdicts, None, [model], {})


def _run_job(running) -> tuple[Job, EmptyPipeline]:
    catalog, store = running.receiver.catalog, running.receiver.store
    ((study_id, seen),) = receiving_studies(catalog)
    assert mark_complete(catalog, study_id, seen, "test")
    pipeline = EmptyPipeline()
    worker = Worker(running.settings, catalog, store, pipeline_factory=lambda: pipeline)
    assert worker.run_once()
    with catalog.read() as s:
        return s.scalars(select(Job)).one(), pipeline


def _series_from(source: Path, out: Path, n: int, positions=None) -> list[Path]:
    """``n`` slices of one new series, each a copy of ``source`` (pixel bytes untouched)."""
    out.mkdir()
    study, series = generate_uid(), generate_uid()
    paths = []
    for i in range(n):
        ds = pydicom.dcmread(source)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        pos = positions[i] if positions else [0.0, 0.0, 3.0 * i]
        ds.ImagePositionPatient = [float(v) for v in pos]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        paths.append(_save(ds, out / f"{i:03d}.dcm"))
    return paths


def _send_as_is(port: int, paths: list[Path]) -> list[int]:
    """Send files byte-for-byte in their own transfer syntax."""
    ae = AE(ae_title="TESTSCU")
    for ts in {
        str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID) for p in paths
    }:
        ae.add_requested_context(CT, ts)
    assoc = serves_no_requests(ae.associate("127.0.0.1", port, ae_title="CSPINE"))
    assert assoc.is_established
    with chunked_send():
        out = [int(assoc.send_c_store(p).Status) for p in paths]
    assoc.release()
    return out


SMALL_SERIES = {"selection": {"min_slices": 3, "min_coverage_mm": 0}}


def test_jpeg_lossless_decoding_to_garbage_is_stored_then_not_processed(
    start_node, tmp_path, real_data
):
    running = start_node(**SMALL_SERIES)
    paths = _series_from(real_data / REAL_BAD_JPEG, tmp_path / "bad", 5)
    # the node stores bytes as sent and does not decode on receive: accepted, byte-exact
    assert _send_as_is(running.port, paths) == [0] * 5
    with running.receiver.catalog.read() as s:
        rows = list(s.scalars(select(Instance)))
    sent = {pydicom.dcmread(p).SOPInstanceUID: p for p in paths}
    for row in rows:
        assert row.transfer_syntax_uid == "1.2.840.10008.1.2.4.57"
        stored = running.store_root / row.file_path
        assert dataset_bytes(stored) == dataset_bytes(sent[row.sop_instance_uid])
    # the worker decodes, finds impossible HU values and says why; the model never runs
    job, pipeline = _run_job(running)
    assert job.state is JobState.NOT_PROCESSED
    assert "pixel data implausible" in job.reason and "outside [-3100, 4000] HU" in job.reason
    assert pipeline.volumes == []
    # the source's placeholder dates (00000000) do not stop the not-processed SR
    with running.receiver.catalog.read() as s:
        (out,) = s.scalars(select(Output).where(Output.job_id == job.id))
    sr = pydicom.dcmread(running.store_root / out.file_path)
    assert out.kind == "sr" and sr.Modality == "SR"
    texts = [str(e.value) for e in sr.iterall() if e.keyword == "TextValue"]
    assert any("pixel data implausible" in t for t in texts), texts
    assert_other_peer_served(running.port)


def test_same_series_from_an_intact_jpeg_lossless_file_is_processed(
    start_node, tmp_path, real_data
):
    running = start_node(**SMALL_SERIES)
    paths = _series_from(real_data / REAL_GOOD_JPEG, tmp_path / "good", 5)
    assert _send_as_is(running.port, paths) == [0] * 5
    job, pipeline = _run_job(running)
    assert job.state is JobState.DONE, job.reason
    assert len(pipeline.volumes) == 1 and pipeline.volumes[0].hu.shape[0] == 5


def _tilted(i: int) -> list[float]:
    return [0.0, 3.0 * i * math.tan(math.radians(20)), 3.0 * i]


GEOMETRY = {
    # case: (slice positions, the issue message the job records)
    "duplicate-positions": (
        [[0, 0, 3.0 * k] for k in (0, 1, 2, 2, 3, 4, 5)],
        "repeat a position already present",
    ),
    "gap": ([[0, 0, 3.0 * k] for k in (0, 1, 2, 3, 7, 8, 9)], "missing slices"),
    "gantry-tilt": ([_tilted(i) for i in range(7)], "gantry tilt"),
}


@pytest.mark.parametrize("case", sorted(GEOMETRY))
def test_irregular_geometry_processed_with_the_issue_recorded(start_node, tmp_path, case):
    positions, message = GEOMETRY[case]
    running = start_node(**SMALL_SERIES)
    from tests.helpers import write_series

    (source,) = write_series(tmp_path / "src", 1)
    paths = _series_from(source, tmp_path / "series", len(positions), positions)
    assert _send_as_is(running.port, paths) == [0] * len(paths)
    job, pipeline = _run_job(running)
    assert job.state is JobState.DONE, job.reason
    issues = json.loads(job.result_json)["geometry_issues"]
    assert any(message in text for text in issues), issues
    (vol,) = pipeline.volumes
    expected = len(positions) - (1 if case == "duplicate-positions" else 0)
    assert vol.hu.shape[0] == expected
    assert_other_peer_served(running.port)


def test_real_gantry_tilt_series_loads_with_typed_issues(real_data):
    paths = sorted((real_data / GE_TILT).glob("*.dcm"))
    vol = load_series(paths)
    codes = {i.code for i in vol.issues}
    assert "gantry_tilt" in codes and codes & {"uneven_spacing", "gap"}
    assert vol.hu.shape == (len(paths), 512, 512)
