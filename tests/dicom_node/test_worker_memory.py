"""The worker's memory-lean paths (issue #9) give the same results as the plain ones.

Each lean path is compared with the whole-array computation it replaced, and its
temporaries are measured with tracemalloc (numpy reports its buffers there).
"""

from __future__ import annotations

import dataclasses
import io
import tracemalloc
import weakref

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
)
from sqlalchemy import select

from ai.synthetic import StudySpec, generate_study, write_study
from ai.types import VERTEBRAE, ModelIdentity, PipelineResult, VertebraResult
from dicom_node import writers
from dicom_node.encode import encode
from dicom_node.receive import Receiver, open_node_storage
from dicom_node.stages.heap import release_memory, tune_malloc
from dicom_node.stages.load import implausible_fraction
from dicom_node.worker import Worker
from dicom_node.writers import render_summary, write_seg, write_summary, write_summary_image
from dicom_node.writers.common import blank_invalid_dates, present_vertebrae
from dicom_node.writers.summary import _label_centroid
from storage.catalog import mark_complete
from storage.models import Job, JobState, Study
from tests.dicom_node.conftest import make_settings
from tests.dicom_node.test_writers import (
    THRESHOLD,
    WHEN,
    _identity,
    ct_affine,
    make_ct_series,
    make_result,
)


def _peak(func, *args):  # type: ignore[no-untyped-def]
    tracemalloc.start()
    try:
        value = func(*args)
        return value, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_present_vertebrae_matches_bincount_without_a_volume_sized_copy() -> None:
    rng = np.random.default_rng(3)
    labels = np.zeros((64, 128, 128), np.uint8)
    for n in (2, 3, 5, 7):
        z = int(rng.integers(0, 60))
        labels[z : z + 4, 10 * n : 10 * n + 5, 40:50] = n
    counts = np.bincount(labels.ravel().astype(np.int64), minlength=8)
    expected = [name for n, name in enumerate(VERTEBRAE, start=1) if counts[n]]
    got, peak = _peak(present_vertebrae, labels)
    assert got == expected == ["C2", "C3", "C5", "C7"]
    assert peak < labels.nbytes // 4  # the bincount cast alone was 8x the map
    assert present_vertebrae(labels.astype(np.int64)) == expected
    assert present_vertebrae(np.zeros((3, 4, 4), np.uint8)) == []


def test_implausible_fraction_counts_exactly_with_slab_sized_temporaries() -> None:
    rng = np.random.default_rng(4)
    hu = rng.integers(-1000, 2000, size=(96, 128, 128), dtype=np.int16)
    hu[10:20, :30] = -3200
    hu[50, 5:9] = 4095
    expected = np.count_nonzero((hu < -3100) | (hu > 4000)) / hu.size
    got, peak = _peak(implausible_fraction, hu)
    assert got == expected > 0
    assert peak < hu.nbytes // 8  # three whole-volume masks were 1.5x the volume
    assert implausible_fraction(np.zeros((0, 4, 4), np.int16)) == 0.0


def test_label_centroid_is_the_mean_voxel_index() -> None:
    rng = np.random.default_rng(5)
    for shape in [(37, 20, 30), (5, 3, 4), (70, 33, 17)]:
        labels = (rng.random(shape) < 0.02).astype(np.uint8) * 3
        labels[0, 0, 0] = 1
        expected = np.argwhere(labels > 0).mean(axis=0)
        np.testing.assert_array_equal(_label_centroid(labels), expected)
    assert _label_centroid(np.zeros((4, 4, 4), np.uint8)) is None


def test_summary_rendered_first_gives_the_same_file(tmp_path) -> None:
    sources, hu = make_ct_series(pixels=False)
    result = make_result()
    direct = write_summary(
        sources,
        hu,
        ct_affine(),
        result,
        threshold=THRESHOLD,
        **_identity("sc"),
        content_datetime=WHEN,
    )
    pixels = render_summary(hu, ct_affine(), result, threshold=THRESHOLD, software_version="0.1.0")
    wrapped = write_summary_image(sources, pixels, result, **_identity("sc"), content_datetime=WHEN)
    direct.save_as(tmp_path / "a.dcm", enforce_file_format=True)
    wrapped.save_as(tmp_path / "b.dcm", enforce_file_format=True)
    assert (tmp_path / "a.dcm").read_bytes() == (tmp_path / "b.dcm").read_bytes()
    for bad in (pixels[:, :-1], pixels.astype(np.uint16), pixels.tolist()):
        try:
            write_summary_image(sources, bad, result, **_identity("sc"))
        except ValueError as exc:
            assert "SUMMARY_SHAPE" in str(exc) or "(720, 1280, 3)" in str(exc)
        else:
            raise AssertionError("a wrong image was accepted")


def test_seg_from_the_label_map_as_is_equals_the_remapped_one(tmp_path) -> None:
    sources, _ = make_ct_series(pixels=False)
    result = make_result()  # C1..C6 present: label n is segment n, no remapping copy
    assert present_vertebrae(result.label_map) == list(VERTEBRAE[:6])
    as_is = write_seg(sources, result, **_identity("seg"), content_datetime=WHEN)
    wide = dataclasses.replace(result, label_map=result.label_map.astype(np.uint16))
    remapped = write_seg(sources, wide, **_identity("seg"), content_datetime=WHEN)
    as_is.save_as(tmp_path / "a.dcm", enforce_file_format=True)
    remapped.save_as(tmp_path / "b.dcm", enforce_file_format=True)
    assert (tmp_path / "a.dcm").read_bytes() == (tmp_path / "b.dcm").read_bytes()


class _TruthPipeline:
    """Truth labels as stage 1; remembers the volume it was given (weakly)."""

    def __init__(self, study) -> None:  # type: ignore[no-untyped-def]
        self.study = study
        self.volume_ref: weakref.ref | None = None

    def run(self, vol) -> PipelineResult:  # type: ignore[no-untyped-def]
        self.volume_ref = weakref.ref(vol.hu)
        labels = np.where(self.study.labels <= 7, self.study.labels, 0).astype(np.uint8)
        verdicts = [VertebraResult(name, True, True, 0.2) for name in VERTEBRAE]
        model = ModelIdentity("stand-in", "0", "0" * 64, "test stand-in", demo=True)
        return PipelineResult(labels, verdicts, 0.2, [model], {"stage1": 0.0, "stage2": 0.0})


def test_worker_frees_the_volume_before_the_seg_and_stores_it_whole(tmp_path, monkeypatch):
    study = generate_study(12, StudySpec.small(fracture_rate=0.0))
    settings = make_settings(tmp_path)
    catalog, store = open_node_storage(settings)
    receiver = Receiver(settings, catalog, store)
    for path in write_study(study, tmp_path / "study"):
        assert receiver.accept(path, consume=False).status == 0
    with catalog.read() as session:
        count = session.get(Study, 1).received_count
    assert mark_complete(catalog, 1, count, "test")
    pipeline = _TruthPipeline(study)
    alive_at_seg: list[bool] = []
    real_write_seg = writers.write_seg

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        alive_at_seg.append(pipeline.volume_ref() is not None)
        return real_write_seg(*args, **kwargs)

    monkeypatch.setattr(writers, "write_seg", spy)
    worker = Worker(settings, catalog, store, pipeline_factory=lambda: pipeline)
    assert worker.run_once()
    with catalog.read() as session:
        job = session.scalars(select(Job)).one()
        assert job.state is JobState.DONE, job.reason
        paths = {o.kind: store.root / o.file_path for o in job.outputs}
    assert alive_at_seg == [False]  # the CT volume was released before the SEG was built
    # the SEG's frames were dropped from memory only after they were stored
    truth = np.where(study.labels <= 7, study.labels, 0).astype(np.uint8)
    seg = pydicom.dcmread(paths["seg"])
    frames = seg.pixel_array
    n_segments = len(present_vertebrae(truth))
    assert frames.shape[0] == int(seg.NumberOfFrames) == n_segments * truth.shape[0]
    assert int(frames.sum()) == int(np.count_nonzero(truth))
    sr = pydicom.dcmread(paths["sr"])
    assert seg.SOPInstanceUID in str(sr.CurrentRequestedProcedureEvidenceSequence)


def test_malloc_tuning_and_release_work_on_this_platform() -> None:
    assert tune_malloc()  # glibc: a fixed mmap threshold
    from dicom_node import service

    assert service.tune_malloc()  # the receiver's settings, arena cap included
    release_memory()
    release_memory(collect=False)


def _pydicom_bytes(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _image(pixel_bytes: bytes, syntax: str = ExplicitVRLittleEndian) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, "1.2.3.4"
    ds.Rows, ds.Columns, ds.BitsAllocated = max(1, len(pixel_bytes) // 4096), 4096, 8
    ds.PixelData = pixel_bytes
    ds["PixelData"].VR = "OB"
    return ds


def test_encoded_outputs_are_the_bytes_pydicom_writes() -> None:
    sources, hu = make_ct_series(pixels=False)
    result = make_result()
    seg = write_seg(sources, result, **_identity("seg"), content_datetime=WHEN)
    sc = write_summary(
        sources,
        hu,
        ct_affine(),
        result,
        threshold=THRESHOLD,
        **_identity("sc"),
        content_datetime=WHEN,
    )
    sr = writers.write_sr(
        sources, seg, result, threshold=THRESHOLD, **_identity("sr"), content_datetime=WHEN
    )
    odd = _image(b"\x01\x02\x03")  # padded to even length
    implicit = _image(b"\x01\x02", ImplicitVRLittleEndian)  # pydicom writes it all
    trailing = _image(b"\x01\x02")
    trailing.DataSetTrailingPadding = b"\x00\x00"  # an element after Pixel Data
    for ds in (seg, sc, sr, odd, implicit, trailing):
        before = sorted(ds.keys())
        pixels = ds.get("PixelData")
        assert encode(ds) == _pydicom_bytes(ds)
        assert sorted(ds.keys()) == before  # Pixel Data is back
        assert ds.get("PixelData") is pixels


def test_encoding_copies_large_pixel_data_once() -> None:
    ds = _image(bytes(range(256)) * (64 << 10))  # 16 MiB
    ds["PixelData"].VR = "OB or OW"  # as highdicom leaves it; resolved as pydicom does
    size = len(ds.PixelData)
    encoded, peak = _peak(encode, ds)
    assert len(encoded) > size
    assert peak < 1.2 * size  # the joined file; pydicom's own path holds 3 copies at once
    del encoded
    _, pydicom_peak = _peak(_pydicom_bytes, ds)
    assert pydicom_peak > 1.8 * size  # what this saves


@pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning")
@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_invalid_dates_are_blanked_in_files_of_either_vr_encoding(tmp_path, syntax) -> None:
    ds = _image(b"\x00\x01", syntax)
    ds.StudyDate, ds.StudyTime = "00000000", "101500"
    ds.SeriesDate, ds.ContentTime = "20240230", "2599"
    ds.AcquisitionDateTime = "20240101120000"
    ds.PatientName = "Date^Test"
    path = tmp_path / "dates.dcm"
    ds.save_as(path, enforce_file_format=True)
    read = blank_invalid_dates(pydicom.dcmread(path, stop_before_pixels=True))
    assert read.StudyDate in (None, "") and read.SeriesDate in (None, "")
    assert read.ContentTime in (None, "")
    assert read.StudyTime == "101500" and read.AcquisitionDateTime == "20240101120000"
    assert read.PatientName == "Date^Test"
