"""Jobs, series selection, outputs and delivery, with a small deterministic pipeline.

The real demo models run in the end-to-end test; here a stand-in pipeline (truth
labels and fixed probabilities) keeps the job mechanics fast to test.
"""

from __future__ import annotations

import datetime as dt
import logging

import numpy as np
import pydicom
import pytest
from sqlalchemy import select, update

from ai.synthetic import StudySpec, generate_study, write_study
from ai.types import VERTEBRAE, ModelIdentity, PipelineResult, VertebraResult
from config.digest import sha256_file
from dicom_node import destinations as destination_rows
from dicom_node.delivery import classify, deliver_due
from dicom_node.receive import Receiver, open_node_storage
from dicom_node.selection import SeriesCandidate, select_series
from dicom_node.worker import Worker
from storage.catalog import mark_complete
from storage.jobs import requeue_orphans
from storage.models import Job, JobState, OutboxItem, OutboxState, Output
from tests.dicom_node.conftest import make_settings
from tests.dicom_node.pacs import LoopbackPACS


class TruthPipeline:
    """Stage 1 = synthetic truth labels; stage 2 = fixed probabilities (0.9 on fractures)."""

    def __init__(self, study) -> None:
        self.study = study

    def run(self, vol) -> PipelineResult:
        labels = np.where(self.study.labels <= 7, self.study.labels, 0).astype(np.uint8)
        assert labels.shape == vol.hu.shape
        verdicts = []
        for i, name in enumerate(VERTEBRAE, start=1):
            if (labels == i).any():
                p = 0.9 if self.study.vertebra_fractured[name] else 0.1
                verdicts.append(VertebraResult(name, True, True, p))
            else:
                verdicts.append(VertebraResult(name, False, False, None, "not in field of view"))
        model = ModelIdentity("stand-in", "0", "0" * 64, "test stand-in", demo=True)
        return PipelineResult(labels, verdicts, 0.9, [model], {"stage1": 0.0, "stage2": 0.0})


@pytest.fixture
def study():
    # feet-first order with a scout and a soft-tissue series beside the bone series
    return generate_study(
        11, StudySpec.small(fracture_rate=1.0, extra_series=True, patient_position="FFS")
    )


@pytest.fixture
def pacs():
    p = LoopbackPACS().start()
    yield p
    p.stop()


def _node(tmp_path, study, destinations=()):
    settings = make_settings(tmp_path)
    if destinations:
        from config import load_settings

        settings = load_settings(
            overrides={**settings.model_dump(mode="json"), "destinations": list(destinations)},
            environ={},
        )
    catalog, store = open_node_storage(settings)
    destination_rows.sync(settings, catalog)  # as `cspine serve` does when it starts
    receiver = Receiver(settings, catalog, store)
    files = write_study(study, tmp_path / "study")
    for path in files:
        assert receiver.accept(path, consume=False).status == 0
    worker = Worker(settings, catalog, store, pipeline_factory=lambda: TruthPipeline(study))
    return settings, catalog, store, worker


def _complete(catalog, study_id=1):
    with catalog.read() as s:
        from storage.models import Study

        count = s.get(Study, study_id).received_count
    assert mark_complete(catalog, study_id, count, "test")


def test_selection_picks_bone_kernel_axial_series(tmp_path, study):
    settings, catalog, store, _ = _node(tmp_path, study)
    with catalog.read() as s:
        from storage.models import Series

        cands = [
            SeriesCandidate(
                se.series_instance_uid,
                [store.root / i.file_path for i in se.instances],
                se.series_number,
            )
            for se in s.scalars(select(Series))
        ]
    assert len(cands) == 3
    chosen = select_series(cands, settings.selection)
    bone = pydicom.dcmread(next((tmp_path / "study" / "2_bone").iterdir()))
    assert chosen.series.series_instance_uid == bone.SeriesInstanceUID
    assert "localizer" in chosen.note and "also eligible" in chosen.note


def test_job_outputs_join_the_study_and_are_delivered_once(tmp_path, study, pacs):
    settings, catalog, store, worker = _node(
        tmp_path, study, [{"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}]
    )
    _complete(catalog)
    assert worker.run_once()
    with catalog.read() as s:
        job = s.scalars(select(Job)).one()
        assert job.state is JobState.DONE, job.reason
        kinds = sorted(o.kind for o in job.outputs)
    assert kinds == ["seg", "sr", "summary"]
    assert deliver_due(settings, catalog, store) == 3
    assert deliver_due(settings, catalog, store) == 0  # nothing sent twice
    assert len(pacs.received) == 3 and len(set(pacs.uids())) == 3
    source = pydicom.dcmread(next((tmp_path / "study" / "2_bone").iterdir()))
    for ds in pacs.received:  # outputs join the source study, in new series
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.PatientID == source.PatientID
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    classes = sorted(str(ds.SOPClassUID) for ds in pacs.received)
    assert classes == [
        "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation
        "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture
        "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
    ]


def test_destination_down_then_up_delivers_without_duplicates(tmp_path, study):
    pacs = LoopbackPACS()
    settings, catalog, store, worker = _node(
        tmp_path, study, [{"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}]
    )
    _complete(catalog)
    worker.run_once()
    assert deliver_due(settings, catalog, store) == 0  # destination down
    with catalog.read() as s:
        items = list(s.scalars(select(OutboxItem)))
    assert {i.state for i in items} == {OutboxState.PENDING}
    assert all(i.attempts == 1 and i.last_status == "no association" for i in items)
    assert deliver_due(settings, catalog, store) == 0  # backoff: not yet due
    pacs.start()
    try:
        catalog.write(
            lambda s: s.execute(update(OutboxItem).values(next_attempt_at=dt.datetime(2000, 1, 1)))
        )
        assert deliver_due(settings, catalog, store) == 3
        assert deliver_due(settings, catalog, store) == 0
        assert len(pacs.received) == 3 and len(set(pacs.uids())) == 3
    finally:
        pacs.stop()


@pytest.mark.parametrize(
    ("status", "state"),
    [
        (0xA700, OutboxState.PENDING),
        (0xA900, OutboxState.DEAD),
        (0xC000, OutboxState.DEAD),
        (0xA7FF, OutboxState.PENDING),
        (0xC210, OutboxState.DEAD),
        (0xB000, OutboxState.SENT),
        (0xB007, OutboxState.SENT),
        (0x0000, OutboxState.SENT),
        (0x0107, OutboxState.SENT),  # general Warning status (PS3.7 Annex C)
        (0xFF00, OutboxState.DEAD),  # Pending is no answer to a C-STORE
        (0x1234, OutboxState.DEAD),  # unknown
        (None, OutboxState.PENDING),
    ],
)
def test_status_classification(status, state):
    assert classify(status) is state


def test_permanent_failure_is_dead_lettered_transient_retried(tmp_path, study, pacs):
    settings, catalog, store, worker = _node(
        tmp_path, study, [{"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}]
    )
    _complete(catalog)
    worker.run_once()
    pacs.statuses = [0xA900, 0xA700]  # first output refused for good, second out of resources
    assert deliver_due(settings, catalog, store) == 1
    with catalog.read() as s:
        states = sorted(i.state.value for i in s.scalars(select(OutboxItem)))
    assert states == ["DEAD", "PENDING", "SENT"]


def test_late_series_gives_a_new_result_version(tmp_path, study):
    settings, catalog, store, worker = _node(tmp_path, study)
    _complete(catalog)
    worker.run_once()
    # a late series in the same study: a second reconstruction of the bone series
    from pydicom.uid import generate_uid

    receiver = Receiver(settings, catalog, store)
    late_series = generate_uid()
    (tmp_path / "late").mkdir()
    for i, path in enumerate(sorted((tmp_path / "study" / "2_bone").iterdir())):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = late_series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesNumber = 5
        out = tmp_path / "late" / f"{i}.dcm"
        ds.save_as(out, enforce_file_format=True)
        assert receiver.accept(out, consume=False).status == 0
    _complete(catalog)
    worker.run_once()
    with catalog.read() as s:
        jobs = list(s.scalars(select(Job).order_by(Job.version)))
        assert [j.version for j in jobs] == [1, 2]
        assert all(j.state is JobState.DONE for j in jobs)
        uids = [o.sop_instance_uid for j in jobs for o in j.outputs]
    assert len(uids) == 6 and len(set(uids)) == 6  # new version, new UIDs


def test_running_job_of_dead_worker_is_requeued_and_completes_once(tmp_path, study):
    _settings, catalog, _store, worker = _node(tmp_path, study)
    _complete(catalog)
    from storage.jobs import claim_next

    claimed = claim_next(catalog, "otherhost:12345")  # a worker that then died
    assert claimed is not None
    assert worker.run_once() is False  # nothing queued while it is RUNNING
    assert requeue_orphans(catalog, lambda w: False) == [claimed.id]
    assert worker.run_once() is True
    with catalog.read() as s:
        job = s.scalars(select(Job)).one()
        assert job.state is JobState.DONE and job.attempts == 2
        assert len(list(s.scalars(select(Output)))) == 3


def test_a_worker_that_lost_its_lease_records_nothing(tmp_path, study):
    """Worker 1 hangs past the stale limit; a worker of another host takes the job over
    and completes it; worker 1 then finishes late: its result is dropped, its files do
    not replace the new holder's, and the job is DONE once."""
    from storage.models import JobEvent

    settings, catalog, store, worker = _node(tmp_path, study)
    _complete(catalog)
    job = worker.storage.claim(worker.id)
    assert job is not None
    old = dt.datetime.now(dt.UTC).replace(tzinfo=None) - dt.timedelta(hours=1)
    catalog.write(lambda s: s.execute(update(Job).values(heartbeat_at=old)))
    assert requeue_orphans(catalog, lambda w: True) == [job.id]
    other = Worker(settings, catalog, store, pipeline_factory=lambda: TruthPipeline(study))
    other.id = "otherhost:77"
    assert other.run_once() is True
    assert worker.storage.heartbeat(job.id) is False
    worker.process(job)  # the first worker's late ending: no exception, nothing recorded
    with catalog.read() as s:
        row = s.get(Job, job.id)
        assert row.state is JobState.DONE and row.worker == "otherhost:77" and row.attempts == 2
        recorded = {o.file_path: o.sha256 for o in s.scalars(select(Output))}
        done = [e for e in s.scalars(select(JobEvent)) if e.state is JobState.DONE]
    assert len(recorded) == 3 and all(p.startswith(f"outputs/{job.id}/a2_") for p in recorded)
    assert len(done) == 1
    for rel, sha in recorded.items():  # the holder's files were not overwritten
        assert sha256_file(store.root / rel) == sha
    assert len(list((store.root / "outputs" / str(job.id)).iterdir())) == 6


def test_worker_waits_out_an_unreachable_catalog_then_takes_over_a_dead_workers_job(tmp_path):
    """PostgreSQL stops under a running worker: the worker stays up and claims nothing;
    once the server is back it re-queues the job of a dead worker of this host and
    processes it."""
    import socket
    import threading
    import time

    from storage.jobs import claim_next, enqueue_job
    from storage.models import Study, StudyState
    from tests.storage.pg import PostgresServer, require_postgres

    server = PostgresServer(require_postgres())
    server.start()
    try:
        url = server.create_database()
        settings = make_settings(
            tmp_path, storage={"database_url": url}, worker={"poll_seconds": 0.1}
        )
        catalog, store = open_node_storage(settings)
        catalog.busy_deadline_s = 0.5

        def add(session):  # type: ignore[no-untyped-def]
            study = Study(study_instance_uid="1.2.3", state=StudyState.COMPLETE)
            session.add(study)
            session.flush()
            enqueue_job(session, study.id, "test")

        catalog.write(add)
        dead = f"{socket.gethostname()}:999999"  # no such process on this host
        job = claim_next(catalog, dead)
        assert job is not None
        worker = Worker(settings, catalog, store, pipeline_factory=lambda: object())
        server.halt()
        thread = threading.Thread(target=worker.run_forever, daemon=True)
        thread.start()
        time.sleep(2)
        assert thread.is_alive()  # did not die on the unreachable catalog
        server.start_again()
        deadline = time.monotonic() + 30
        state = None
        while time.monotonic() < deadline:
            with catalog.read() as s:
                row = s.get(Job, job.id)
                state, holder, attempts = row.state, row.worker, row.attempts
            if state not in (JobState.QUEUED, JobState.RUNNING):
                break
            time.sleep(0.2)
        worker.stop_event.set()
        thread.join(10)
        assert not thread.is_alive()
        # no series at all: NOT_PROCESSED, by this worker, on the second claim
        assert (state, holder, attempts) == (JobState.NOT_PROCESSED, worker.id, 2)
        catalog.dispose()
    finally:
        server.stop()


def _scout_only(tmp_path, pacs):
    """A node sending to ``pacs``, and the scout (localizer) series of a synthetic study."""
    from ai.synthetic import write_series
    from config import load_settings

    study = generate_study(13, StudySpec.small(extra_series=True))
    settings = load_settings(
        overrides={
            **make_settings(tmp_path).model_dump(mode="json"),
            "destinations": [{"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}],
        },
        environ={},
    )
    catalog, store = open_node_storage(settings)
    destination_rows.sync(settings, catalog)  # as `cspine serve` does when it starts
    scout = next(e for e in study.extra_series if e.name == "scout")
    paths = write_series(study, tmp_path / "scout", series=scout)
    return study, settings, catalog, store, Receiver(settings, catalog, store), paths


def test_study_without_eligible_series_is_not_processed_and_says_why(tmp_path, pacs):
    study, settings, catalog, store, receiver, paths = _scout_only(tmp_path, pacs)
    for path in paths:
        assert receiver.accept(path, consume=False).status == 0
    _complete(catalog)
    worker = Worker(settings, catalog, store, pipeline_factory=lambda: TruthPipeline(study))
    assert worker.run_once()
    with catalog.read() as s:
        job = s.scalars(select(Job)).one()
        assert job.state is JobState.NOT_PROCESSED
        assert "no eligible series" in job.reason and "localizer" in job.reason
        assert [o.kind for o in job.outputs] == ["sr"]
    assert deliver_due(settings, catalog, store) == 1
    (sr,) = pacs.received
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
    texts = []

    def walk(items):
        for item in items:
            texts.append(str(item.get("TextValue", "")))
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    assert any("no eligible series" in t for t in texts)


def test_pipeline_error_fails_the_job_with_its_reason_and_no_outputs(tmp_path, study):
    """With ``worker.send_failed_sr = false`` a failed job sends nothing."""

    class Broken:
        def run(self, vol):
            raise RuntimeError("stage 1 exploded")

    _, catalog, store, _ = _node(tmp_path, study)
    settings = make_settings(tmp_path, worker={"send_failed_sr": False})
    worker = Worker(settings, catalog, store, pipeline_factory=Broken)
    _complete(catalog)
    assert worker.run_once()
    with catalog.read() as s:
        job = s.scalars(select(Job)).one()
        assert job.state is JobState.FAILED
        assert job.reason == "RuntimeError: stage 1 exploded"
        assert job.outputs == []
        assert [e.state for e in job.events][-1] is JobState.FAILED


def _sr_texts(ds) -> list[str]:
    texts = []

    def walk(items):
        for item in items:
            if "TextValue" in item:
                texts.append(str(item.TextValue))
            walk(item.get("ContentSequence", []))

    walk(ds.ContentSequence)
    return texts


def test_failed_job_stays_visible_and_delivers_an_internal_error_sr(tmp_path, study, pacs, caplog):
    """A pipeline exception: FAILED in cspine status, and the PACS gets a not-processed SR
    saying only "internal error (job N)", without the exception text, in SR or logs."""
    settings, catalog, store, _ = _node(
        tmp_path, study, [{"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}]
    )
    assert settings.worker.send_failed_sr  # the default
    source = pydicom.dcmread(next((tmp_path / "study" / "2_bone").iterdir()))
    patient_name, patient_id = str(source.PatientName), str(source.PatientID)
    secret = f"stage 1 exploded on {patient_name} {patient_id}"

    class Broken:
        def run(self, vol):
            raise RuntimeError(secret)

    worker = Worker(settings, catalog, store, pipeline_factory=Broken)
    _complete(catalog)
    caplog.set_level("DEBUG")
    assert worker.run_once()
    with catalog.read() as s:
        job = s.scalars(select(Job)).one()
        assert job.state is JobState.FAILED
        assert job.reason == f"RuntimeError: {secret}"  # the operator keeps the full reason
        assert [o.kind for o in job.outputs] == ["sr"]
        job_id = job.id
    from dicom_node.reports import status_lines
    from storage.jobs import status_report

    lines = list(status_lines(status_report(catalog)))
    assert any("FAILED 1" in line for line in lines if line.startswith("jobs:"))
    assert any(line.startswith(f"  job {job_id} (study 1) FAILED: RuntimeError") for line in lines)

    assert deliver_due(settings, catalog, store) == 1
    (sr,) = pacs.received
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    from dicom_node.writers import read_sr_result

    values = read_sr_result(sr)
    assert list(values) == ["study not processed"]
    assert values["study not processed"]["reason"] == f"internal error (job {job_id})"
    assert values["study not processed"]["evaluation"] == "not assessed"
    texts = " | ".join(_sr_texts(sr))
    for leaked in ("exploded", "RuntimeError", "Traceback", patient_id):
        assert leaked not in texts, leaked

    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    logged = "\n".join(formatter.format(r) for r in caplog.records)
    assert f"job failed job_id={job_id} error=RuntimeError at=" in logged
    for leaked in ("exploded", "Traceback", patient_name, patient_id):
        assert leaked not in logged, leaked


def test_failed_job_sr_never_shares_the_uids_of_a_result_sr(tmp_path, study):
    class Broken:
        def run(self, vol):
            raise RuntimeError("stage 2 exploded")

    settings, catalog, store, _ = _node(tmp_path, study)
    worker = Worker(settings, catalog, store, pipeline_factory=Broken)
    _complete(catalog)
    assert worker.run_once()
    from dicom_node.uids import output_uid
    from storage.catalog import find_study

    with catalog.read() as s:
        job = s.scalars(select(Job)).one()
        (out,) = job.outputs
        key = find_study(catalog, str(job.study_id)).key
        assert out.file_path.endswith("failed_sr.dcm")
        assert (store.root / out.file_path).is_file()
        # the UIDs a DONE or NOT_PROCESSED SR of the same job version gets
        assert out.sop_instance_uid != output_uid(key, job.version, "sr")
        assert out.series_instance_uid != output_uid(key, job.version, "sr-series")


def test_not_processed_sr_is_written_from_an_image_with_a_place_when_the_study_has_one(
    tmp_path, pacs
):
    """The first series holds instances with no plane in a frame of reference: the
    not-processed SR is written from the next series' image instead, so that its finding
    is located at the field of view examined (a viewer such as OHIF needs a location)."""
    import highdicom as hd

    study, settings, catalog, store, receiver, paths = _scout_only(tmp_path, pacs)
    placed = pydicom.dcmread(paths[0], stop_before_pixels=True)
    # a first series (lower series number) whose instances have no geometry
    unplaced = pydicom.dcmread(paths[0])
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "FrameOfReferenceUID"):
        del unplaced[keyword]
    unplaced.SeriesInstanceUID = pydicom.uid.generate_uid()
    unplaced.SeriesNumber = 0
    unplaced.SOPInstanceUID = unplaced.file_meta.MediaStorageSOPInstanceUID = (
        pydicom.uid.generate_uid()
    )
    unplaced.save_as(tmp_path / "unplaced.dcm", enforce_file_format=True)
    for path in [tmp_path / "unplaced.dcm", *paths]:
        assert receiver.accept(path, consume=False).status == 0
    _complete(catalog)
    worker = Worker(settings, catalog, store, pipeline_factory=lambda: TruthPipeline(study))
    assert worker.run_once()
    assert deliver_due(settings, catalog, store) == 1
    (sr,) = pacs.received
    report = hd.sr.Comprehensive3DSR.from_dataset(sr).content
    (located,) = report.get_planar_roi_measurement_groups()
    region = located.roi
    assert region is not None and region.frame_of_reference_uid == placed.FrameOfReferenceUID
