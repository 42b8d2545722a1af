"""Writers: DICOM SEG, TID 1500 SR, not-processed SR and summary Secondary Capture.

Each output is written to a file and checked with the real tools (dciodvfy, dsrdump)
and read back with highdicom.
"""

from __future__ import annotations

import dataclasses
import datetime
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from scipy import ndimage

from ai.types import VERTEBRAE, ModelIdentity, PipelineResult, VertebraResult
from dicom_node.writers import (
    DEMO_DISCLAIMER,
    SUMMARY_SHAPE,
    VERTEBRA_CODES,
    VERTEBRA_COLORS,
    read_sr_result,
    render_summary,
    segment_numbers,
    write_not_processed_sr,
    write_seg,
    write_sr,
    write_summary,
)
from dicom_node.writers.sr import FRACTURE, PROBABILITY, _outline
from dicom_node.writers.summary import OVERLAY_ALPHA

N_SLICES, ROWS, COLS = 20, 64, 64
SLICE_MM, PIXEL_MM = 2.0, 0.8
WHEN = datetime.datetime(2024, 5, 6, 7, 8, 9)
PROBS = {"C1": 0.05, "C2": 0.91, "C3": 0.12, "C4": None, "C5": 0.3, "C6": 0.5, "C7": None}
TYPE2_OUTPUT_ATTRIBUTES = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)
"""Type 2 attributes of the Patient and General Study modules, in every output."""
THRESHOLD = 0.5


def make_ct_series(*, pixels: bool = True, seed: str = "a") -> tuple[list[Dataset], np.ndarray]:
    """20 axial 64x64 CT slices (2 mm apart, 0.8 mm pixels), ordered inferior to superior."""
    study = generate_uid(entropy_srcs=["study", seed])
    series = generate_uid(entropy_srcs=["series", seed])
    frame = generate_uid(entropy_srcs=["frame", seed])
    _, yy, xx = np.mgrid[0:N_SLICES, 0:ROWS, 0:COLS]
    hu = np.where((yy - 32) ** 2 + (xx - 32) ** 2 < 26**2, 40, -1000).astype(np.int16)
    hu[(yy - 36) ** 2 + (xx - 32) ** 2 < 8**2] = 900
    datasets = []
    for k in range(N_SLICES):
        ds = Dataset()
        sop = generate_uid(entropy_srcs=["sop", seed, str(k)])
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID = "Writer^Test", "WRT-0001"
        ds.PatientBirthDate, ds.PatientSex = "19600102", "F"
        ds.StudyDate, ds.StudyTime, ds.StudyID = "20240101", "101500", "77"
        ds.AccessionNumber, ds.ReferringPhysicianName = "ACC-42", "Ref^Doc"
        ds.Modality, ds.Manufacturer, ds.SeriesNumber, ds.InstanceNumber = "CT", "Acme", 3, k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-25.6, -30.0, -80.0 + SLICE_MM * k]
        ds.PixelSpacing, ds.SliceThickness = [PIXEL_MM, PIXEL_MM], SLICE_MM
        ds.Rows, ds.Columns = ROWS, COLS
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -0.0, 1.0
        if pixels:
            ds.PixelData = hu[k].tobytes()
        datasets.append(ds)
    return datasets, hu


def ct_affine() -> np.ndarray:
    affine = np.eye(4)
    affine[:3, 0] = [0, 0, SLICE_MM]
    affine[:3, 1] = [0, PIXEL_MM, 0]
    affine[:3, 2] = [PIXEL_MM, 0, 0]
    affine[:3, 3] = [-25.6, -30.0, -80.0]
    return affine


def make_result(*, demo: bool = True, probs: dict[str, float | None] = PROBS) -> PipelineResult:
    """C1..C6 segmented as stacked boxes (C1 at the top), C7 absent and not assessed;
    C4 segmented but not assessed."""
    label_map = np.zeros((N_SLICES, ROWS, COLS), np.uint8)
    for n in range(1, 7):
        top = N_SLICES - 3 * (n - 1)
        label_map[top - 3 : top - 1, 28 + n : 44, 26 : 38 - (n % 2)] = n
    verdicts = []
    for name in VERTEBRAE:
        p = probs[name]
        reason = {"C4": "segmentation too small", "C7": "outside field of view"}.get(name)
        verdicts.append(
            VertebraResult(name, name != "C7", p is not None, p, reason if p is None else None)
        )
    models = [
        ModelIdentity("seg-demo", "1.0.0", "a1" * 32, "stage 1", demo),
        ModelIdentity("cls-demo", "1.2.0", "b2" * 32, "stage 2", demo),
    ]
    return PipelineResult(label_map, verdicts, 0.93, models)


def _identity(tag: str) -> dict[str, object]:
    return {
        "series_instance_uid": generate_uid(entropy_srcs=["series", tag]),
        "sop_instance_uid": generate_uid(entropy_srcs=["sop", tag]),
        "series_number": {"seg": 901, "sr": 902, "sc": 903, "np": 904}[tag],
        "software_version": "0.1.0",
    }


def write_outputs(
    sources: list[Dataset],
    hu: np.ndarray,
    result: PipelineResult,
    *,
    selection_note: str | None = None,
    reason: str = "no axial CT series with at least 50 slices",
) -> dict[str, Dataset]:
    """SEG, SR, summary image and not-processed SR (``seg``, ``sr``, ``sc``, ``np``)."""
    seg = write_seg(sources, result, **_identity("seg"), content_datetime=WHEN)
    return {
        "seg": seg,
        "sr": write_sr(
            sources,
            seg,
            result,
            threshold=THRESHOLD,
            **_identity("sr"),
            selection_note=selection_note,
            content_datetime=WHEN,
        ),
        "sc": write_summary(
            sources,
            hu,
            ct_affine(),
            result,
            threshold=THRESHOLD,
            **_identity("sc"),
            content_datetime=WHEN,
        ),
        "np": write_not_processed_sr(
            sources, reason, **_identity("np"), models=result.models, content_datetime=WHEN
        ),
    }


def save_outputs(outputs: dict[str, Dataset], out: Path) -> dict[str, Path]:
    """Each output saved as ``<name>.dcm`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, ds in outputs.items():
        paths[name] = out / f"{name}.dcm"
        ds.save_as(paths[name], enforce_file_format=True)
    return paths


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, object]:
    """All four outputs for the same inputs, written to files."""
    out = tmp_path_factory.mktemp("writers")
    sources, hu = make_ct_series(pixels=False)
    result = make_result()
    outputs = write_outputs(sources, hu, result, selection_note="series 3: thinnest bone kernel")
    paths = save_outputs(outputs, out)
    seg = outputs["seg"]
    return {"paths": paths, "sources": sources, "hu": hu, "result": result, "seg": seg}


@pytest.mark.parametrize(
    ("name", "iod"),
    [
        ("seg", "Segmentation"),
        ("sr", "Comprehensive3DSR"),
        ("sc", "SCImage"),
        ("np", "Comprehensive3DSR"),
    ],
)
def test_dciodvfy_reports_no_error(written, name, iod):
    proc = subprocess.run(
        ["dciodvfy", str(written["paths"][name])],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert output.splitlines()[0].strip() == iod  # the tool recognised the IOD
    errors = [line for line in output.splitlines() if "Error" in line]
    assert errors == []


def test_dsrdump_renders_probabilities_and_verdicts(written):
    proc = subprocess.run(
        ["dsrdump", "-Ec", "+Pl", str(written["paths"]["sr"])],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    text = proc.stdout
    assert "Comprehensive 3D SR" in text
    for name, p in PROBS.items():
        if p is not None:
            assert f'<contains NUM:(,,"Probability")="{p:g}"' in text, name
    assert '"Probability")="0.93"' in text  # patient level
    assert '"Threshold Value")="0.5"' in text
    assert text.count('=(52101004,SCT,"Present")') == 3  # C2, C6 (p == threshold), patient
    assert text.count('=(373121007,SCT,"Not Evaluated")') == 2  # C4, C7
    assert '(14806007,SCT,"C1 vertebra")' in text
    assert 'TEXT:(,,"Comment")="synthetic demo weights' in text
    dump_np = subprocess.run(
        ["dsrdump", "-Ec", "+Pl", str(written["paths"]["np"])],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "not processed: no axial CT series" in dump_np


def test_seg_reads_back_to_the_label_map(written):
    seg = hd.seg.segread(written["paths"]["seg"])
    sources, result = written["sources"], written["result"]
    assert seg.SegmentationType == "BINARY"
    numbers = segment_numbers(seg)
    assert numbers == {f"C{n}": n for n in range(1, 7)}  # C7 has no voxels, so no segment
    for name, number in numbers.items():
        description = seg.get_segment_description(number)
        assert description.segment_label == name
        assert description.segmented_property_type == VERTEBRA_CODES[name]
        assert description.segmented_property_category == codes.SCT.AnatomicalStructure
        assert description.algorithm_type.value == "AUTOMATIC"
        algorithm = description.algorithm_identification[0]
        assert algorithm.AlgorithmName == "seg-demo+cls-demo"
        assert algorithm.AlgorithmVersion == "1.0.0+1.2.0"
        assert algorithm.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"
    # full, regular frame stack: one frame per segment and source slice
    assert int(seg.NumberOfFrames) == 6 * N_SLICES
    pixels = seg.get_pixels_by_source_instance(
        [ds.SOPInstanceUID for ds in sources], combine_segments=True
    )
    assert pixels.shape == result.label_map.shape
    np.testing.assert_array_equal(pixels, result.label_map)  # numbers == labels here
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in referenced.ReferencedInstanceSequence} == {
        ds.SOPInstanceUID for ds in sources
    }


def test_seg_segment_numbers_are_remapped_when_a_vertebra_is_missing():
    sources, _ = make_ct_series(pixels=False)
    result = make_result()
    result.label_map[result.label_map == 2] = 0  # no C2 voxels: C3 becomes segment 2
    seg = write_seg(sources, result, **_identity("seg"), omit_empty_frames=True)
    numbers = segment_numbers(seg)
    assert numbers == {"C1": 1, "C3": 2, "C4": 3, "C5": 4, "C6": 5}
    seg = hd.seg.Segmentation.from_dataset(seg)
    uids = [ds.SOPInstanceUID for ds in sources]
    c3 = seg.get_pixels_by_source_instance(
        uids, segment_numbers=[2], combine_segments=True, assert_missing_frames_are_empty=True
    )
    np.testing.assert_array_equal(c3 > 0, result.label_map == 3)
    assert int(seg.NumberOfFrames) < 5 * N_SLICES  # sparse when asked


def test_sr_reads_back_to_the_same_values(written):
    ds = pydicom.dcmread(written["paths"]["sr"])
    values = read_sr_result(ds)
    assert set(values) == {*VERTEBRAE, "patient"}
    for name, p in PROBS.items():
        got = values[name]
        if p is None:
            assert got["probability"] is None
            assert got["evaluation"] == "not assessed"
        else:
            assert got["probability"] == pytest.approx(p, abs=1e-12)
            assert got["evaluation"] == ("present" if p >= THRESHOLD else "absent")
    assert values["C4"]["reason"] == "segmentation too small"
    assert values["C7"]["reason"] == "outside field of view"
    assert values["C4"]["segment_number"] == 4  # not assessed but segmented: references it
    assert values["C7"]["segment_number"] is None
    assert values["patient"]["probability"] == pytest.approx(0.93)
    assert values["patient"]["threshold"] == pytest.approx(THRESHOLD)
    assert values["patient"]["evaluation"] == "present"
    assert "series 3: thinnest bone kernel" in values["patient"]["comments"]

    # the same through highdicom's own accessors
    report = hd.sr.srread(written["paths"]["sr"]).content
    seg = written["seg"]
    groups = report.get_volumetric_roi_measurement_groups()
    assert [g.tracking_identifier for g in groups] == ["C1", "C2", "C3", "C4", "C5", "C6"]
    for group in groups:
        name = group.tracking_identifier
        assert group.finding_type == FRACTURE
        assert group.finding_sites[0].value == VERTEBRA_CODES[name]
        ref = group.referenced_segment[0].ReferencedSOPSequence[0]
        assert ref.ReferencedSOPInstanceUID == seg.SOPInstanceUID
        assert ref.ReferencedSegmentNumber == segment_numbers(seg)[name]
        # SR tracking UID names the same finding as the SEG segment
        number = int(ref.ReferencedSegmentNumber)
        assert group.tracking_uid == seg.SegmentSequence[number - 1].TrackingUID
        probabilities = group.get_measurements(name=PROBABILITY)
        assert [m.value for m in probabilities] == ([] if PROBS[name] is None else [PROBS[name]])
        if probabilities:
            assert probabilities[0].unit.value == "{probability}"
    (c7,) = report.get_image_measurement_groups(finding_site=VERTEBRA_CODES["C7"])
    assert c7.get_qualitative_evaluations(name=FRACTURE)[0].value == codes.SCT.NotEvaluated
    evidence = pydicom.dcmread(written["paths"]["sr"]).CurrentRequestedProcedureEvidenceSequence
    referenced = {
        i.ReferencedSOPInstanceUID
        for study in evidence
        for series in study.ReferencedSeriesSequence
        for i in series.ReferencedSOPSequence
    }
    assert seg.SOPInstanceUID in referenced
    assert written["sources"][0].SOPInstanceUID in referenced


def _pixel_corners(mask: np.ndarray) -> set[tuple[int, int]]:
    """(x, y) pixel corners on the edge of ``mask``: SCOORD coordinates, where pixel
    (row r, column c) spans x in [c, c + 1] and y in [r, r + 1]."""
    padded = np.pad(mask, 1)
    # corner (x, y) touches pixels (y - 1 .. y, x - 1 .. x): inside and outside both
    touching = np.stack(
        [
            padded[dy : dy + mask.shape[0] + 1, dx : dx + mask.shape[1] + 1]
            for dy in (0, 1)
            for dx in (0, 1)
        ]
    )
    edge = touching.any(axis=0) & ~touching.all(axis=0)
    return {(int(x), int(y)) for y, x in zip(*np.nonzero(edge), strict=True)}


def test_sr_places_each_segmented_vertebra_on_the_ct_slice_nearest_its_centroid(written):
    """Each vertebra with voxels also has a TID 1410 group (same tracking identifier and
    UID as its TID 1411 group and SEG segment, no values of its own) whose Image Region
    outlines the vertebra's pixels on the CT slice nearest its centroid; the patient's
    probability is inferred from those outlines, the most probable vertebra first."""
    report = hd.sr.srread(written["paths"]["sr"]).content
    label_map, sources = written["result"].label_map, written["sources"]
    volumetric = {g.tracking_identifier: g for g in report.get_volumetric_roi_measurement_groups()}
    planar = [
        g for g in report.get_planar_roi_measurement_groups() if g.tracking_identifier != "C7"
    ]  # C7, without voxels, is located at the field of view (next test)
    assert [g.tracking_identifier for g in planar] == ["C1", "C2", "C3", "C4", "C5", "C6"]
    outlines = {}
    for group in planar:
        name = group.tracking_identifier
        assert group.tracking_uid == volumetric[name].tracking_uid
        assert group.finding_type == FRACTURE
        assert group.finding_sites[0].value == VERTEBRA_CODES[name]
        assert group.get_measurements() == []
        assert group.get_qualitative_evaluations(name=FRACTURE) == []
        region = group.roi
        assert region is not None and region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        points = region.value
        assert (points[0] == points[-1]).all()  # closed
        ref = region.ContentSequence[0].ReferencedSOPSequence[0]
        k = [str(s.SOPInstanceUID) for s in sources].index(ref.ReferencedSOPInstanceUID)
        assert ref.ReferencedSOPClassUID == sources[k].SOPClassUID
        mask = label_map == VERTEBRAE.index(name) + 1
        zs = np.nonzero(mask.any(axis=(1, 2)))[0]
        centroid = np.nonzero(mask)[0].mean()
        assert abs(k - centroid) == min(abs(zs - centroid)), name
        # every vertex is a corner on the edge of the vertebra's pixels on that slice, and
        # the polygon encloses them all (the boxes of make_result are one part each)
        assert {(int(x), int(y)) for x, y in points} <= _pixel_corners(mask[k])
        rows, cols = np.nonzero(mask[k])
        assert points[:, 0].min() == cols.min() and points[:, 0].max() == cols.max() + 1
        assert points[:, 1].min() == rows.min() and points[:, 1].max() == rows.max() + 1
        outlines[name] = (ref.ReferencedSOPInstanceUID, points)
    # the patient's probability: inferred from the line through the assessed vertebrae
    (patient,) = report.get_image_measurement_groups(finding_site=codes.SCT.CervicalSpine)
    (probability,) = patient.get_measurements(name=PROBABILITY)
    (line,) = [item for item in probability[0].ContentSequence if item.ValueType == "SCOORD3D"]
    assert line.RelationshipType == "INFERRED FROM" and line.GraphicType == "POLYLINE"
    assert line.ReferencedFrameOfReferenceUID == sources[0].FrameOfReferenceUID
    points = np.array(line.GraphicData, float).reshape(-1, 3)
    assessed = [n for n, p in PROBS.items() if p is not None]  # C1, C2, C3, C5, C6
    assert len(points) == len(assessed)
    uids = [str(s.SOPInstanceUID) for s in sources]
    for point, name in zip(points, assessed, strict=True):
        # on the slice of the vertebra's outline, inside the outline's bounding box
        image = sources[uids.index(outlines[name][0])]
        position = np.array(image.ImagePositionPatient, float)
        orientation = np.array(image.ImageOrientationPatient, float)
        spacing = np.array(image.PixelSpacing, float)
        offset = point - position
        assert abs(np.dot(offset, np.cross(orientation[:3], orientation[3:]))) < 1e-3
        x = np.dot(offset, orientation[:3]) / spacing[1] + 0.5
        y = np.dot(offset, orientation[3:]) / spacing[0] + 0.5
        corners = outlines[name][1]
        assert corners[:, 0].min() < x < corners[:, 0].max(), name
        assert corners[:, 1].min() < y < corners[:, 1].max(), name


def _field_of_view(group: hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations) -> np.ndarray:
    """The corners of the Image Region of a TID 1410 group that locates a finding at a
    field of view (``(4, 3)``, clockwise from the top left), the group holding no values.

    The region is a closed POLYLINE SCOORD3D through each corner and the middle of each
    edge: 9 vertices (OHIF takes one of 4 or 5 for a rectangle of its own tool)."""
    assert group.get_measurements() == []
    assert group.get_qualitative_evaluations(name=FRACTURE) == []
    (region,) = [i for i in group[0].ContentSequence if i.ValueType in ("SCOORD", "SCOORD3D")]
    assert region.ValueType == "SCOORD3D" and region.GraphicType == "POLYLINE"
    points = np.array(region.GraphicData, float).reshape(-1, 3)
    assert len(points) == 9 and (points[0] == points[-1]).all()
    corners = points[0:8:2]
    middles = (corners + np.roll(corners, -1, axis=0)) / 2
    np.testing.assert_allclose(points[1:9:2], middles, atol=1e-4)  # float32 (FL)
    return corners


def _corners(image: Dataset) -> np.ndarray:
    """Patient coordinates of the outer corners of an image, clockwise from the top left."""
    position = np.array(image.ImagePositionPatient, float)
    orientation = np.array(image.ImageOrientationPatient, float)
    spacing = np.array(image.PixelSpacing, float)
    rows, cols = int(image.Rows), int(image.Columns)
    return np.array(
        [
            position + orientation[:3] * spacing[1] * x + orientation[3:] * spacing[0] * y
            for x, y in (
                (-0.5, -0.5),
                (cols - 0.5, -0.5),
                (cols - 0.5, rows - 0.5),
                (-0.5, rows - 0.5),
            )
        ]
    )


def test_sr_locates_a_finding_without_voxels_at_the_field_of_view_examined(written, tmp_path):
    """A vertebra without voxels (C7, outside the field of view) keeps its TID 1501 group
    with its verdict and reason, followed by a TID 1410 group of the same finding (same
    tracking identifier and UID, no values) whose Image Region is the field of view of
    the middle CT slice (SCOORD3D, the CT's frame of reference): where it was sought, not
    a place for it. With nothing segmented every vertebra and the patient are located so;
    the patient with a probability keeps its line through the vertebrae instead."""
    report = hd.sr.srread(written["paths"]["sr"]).content
    sources = written["sources"]
    middle = sources[len(sources) // 2]
    (c7,) = report.get_image_measurement_groups(finding_site=VERTEBRA_CODES["C7"])
    (located,) = report.get_planar_roi_measurement_groups(finding_site=VERTEBRA_CODES["C7"])
    assert (located.tracking_identifier, located.tracking_uid) == ("C7", c7.tracking_uid)
    assert located.finding_type == FRACTURE
    points = _field_of_view(located)
    np.testing.assert_allclose(points, _corners(middle), atol=1e-4)
    (region,) = [i for i in located[0].ContentSequence if i.ValueType == "SCOORD3D"]
    assert region.ReferencedFrameOfReferenceUID == middle.FrameOfReferenceUID
    # the patient has its probability's line: no field of view
    assert report.get_planar_roi_measurement_groups(finding_site=codes.SCT.CervicalSpine) == []
    # right after the finding's own group, in document order
    (imaging,) = [
        item
        for item in pydicom.dcmread(written["paths"]["sr"]).ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == "126010"
    ]
    order = [
        next(
            c.TextValue
            for c in g.ContentSequence
            if c.ConceptNameCodeSequence[0].CodeValue == "112039"
        )
        for g in imaging.ContentSequence
    ]
    assert order == [n for n in VERTEBRAE for _ in range(2)] + ["patient"]

    result = make_result(probs=dict.fromkeys(VERTEBRAE))
    result.label_map[:] = 0
    result.patient_probability = None
    sr = write_sr(sources, None, result, threshold=THRESHOLD, **_identity("sr"))
    report = hd.sr.Comprehensive3DSR.from_dataset(sr).content
    own = {str(g.tracking_identifier): g for g in report.get_image_measurement_groups()}
    assert set(own) == {*VERTEBRAE, "patient"}
    located = {str(g.tracking_identifier): g for g in report.get_planar_roi_measurement_groups()}
    assert set(located) == set(own)
    for name, group in located.items():
        assert group.tracking_uid == own[name].tracking_uid, name
        np.testing.assert_allclose(_field_of_view(group), _corners(middle), atol=1e-4)
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    output = subprocess.run(
        ["dciodvfy", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert [line for line in (output.stdout + output.stderr).splitlines() if "Error" in line] == []
    values = read_sr_result(pydicom.dcmread(path))
    assert set(values) == {*VERTEBRAE, "patient"}
    assert values["C7"]["reason"] == "outside field of view"
    assert values["patient"]["reason"] == "no vertebra could be assessed"


def test_not_processed_sr_is_located_at_the_field_of_view_of_its_image(written):
    """The not-processed finding is followed by a TID 1410 group of the same finding at
    the field of view of the image it was written from; an instance without a plane in a
    frame of reference (here a dose report's header) gives no location."""
    report = hd.sr.srread(written["paths"]["np"]).content
    (own,) = report.get_image_measurement_groups()
    (located,) = report.get_planar_roi_measurement_groups()
    assert str(located.tracking_identifier) == "study not processed"
    assert located.tracking_uid == own.tracking_uid
    assert located.finding_sites[0].value == codes.SCT.CervicalSpine
    first = written["sources"][0]
    np.testing.assert_allclose(_field_of_view(located), _corners(first), atol=1e-4)

    dose = Dataset()
    for keyword in ("StudyInstanceUID", "PatientName", "PatientID", "StudyDate", "StudyTime"):
        setattr(dose, keyword, first[keyword].value)
    dose.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.67"  # X-Ray Radiation Dose SR
    dose.SOPInstanceUID = generate_uid(entropy_srcs=["dose"])
    dose.SeriesInstanceUID = generate_uid(entropy_srcs=["dose series"])
    dose.Modality = "SR"
    sr = write_not_processed_sr([dose], "no axial CT series", **_identity("np"))
    report = hd.sr.Comprehensive3DSR.from_dataset(sr).content
    assert report.get_planar_roi_measurement_groups() == []
    assert read_sr_result(sr)["study not processed"]["reason"] == "no axial CT series"


def test_outline_follows_the_edge_of_the_largest_part():
    mask = np.zeros((8, 10), bool)
    mask[1:6, 1:6] = True
    mask[3, 3] = False  # a hole: filled
    mask[6, 6] = True  # touches the square at a corner only: another part
    mask[1:3, 7:9] = True  # a smaller part
    mask[1, 1] = False  # a notch in the corner
    # (column, row) pixel corners, clockwise on screen, closed
    assert _outline(mask).tolist() == [[1, 2], [2, 2], [2, 1], [6, 1], [6, 6], [1, 6], [1, 2]]
    with pytest.raises(ValueError, match="no pixel"):
        _outline(np.zeros((3, 3), bool))


def test_not_processed_sr_reads_back(written):
    values = read_sr_result(pydicom.dcmread(written["paths"]["np"]))
    (group,) = values.values()
    assert group["evaluation"] == "not assessed"
    assert group["reason"] == "no axial CT series with at least 50 slices"
    assert DEMO_DISCLAIMER in group["comments"]


@pytest.mark.parametrize("name", ["seg", "sr", "sc", "np"])
def test_outputs_join_the_source_study_as_a_new_series(written, name):
    ds = pydicom.dcmread(written["paths"][name])
    source = written["sources"][0]
    for keyword in ("StudyInstanceUID", *TYPE2_OUTPUT_ATTRIBUTES):
        assert ds[keyword].value == source[keyword].value, keyword
    assert ds.SeriesInstanceUID == _identity(name)["series_instance_uid"]
    assert ds.SOPInstanceUID == _identity(name)["sop_instance_uid"]
    assert ds.SeriesNumber == _identity(name)["series_number"]
    assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    assert ds.Manufacturer == "cspine-node"
    assert ds.SoftwareVersions == "0.1.0"
    equipment = {
        (e.Manufacturer, e.get("ManufacturerModelName"), e.get("SoftwareVersions"))
        for e in ds.ContributingEquipmentSequence
    }
    assert {("cspine-node", "seg-demo", "1.0.0"), ("cspine-node", "cls-demo", "1.2.0")} <= equipment
    assert DEMO_DISCLAIMER in ds.SeriesDescription
    assert ds.ContentDate == "20240506" and ds.ContentTime == "070809"


def test_demo_disclaimer_only_with_demo_models(written, tmp_path):
    seg = pydicom.dcmread(written["paths"]["seg"])
    sc = pydicom.dcmread(written["paths"]["sc"])
    assert seg.ContentDescription == DEMO_DISCLAIMER
    assert DEMO_DISCLAIMER in sc.ImageComments
    sources, hu = make_ct_series(pixels=False)
    result = make_result(demo=False)
    seg = write_seg(sources, result, **_identity("seg"))
    sr = write_sr(sources, seg, result, threshold=THRESHOLD, **_identity("sr"))
    sc = write_summary(sources, hu, ct_affine(), result, threshold=THRESHOLD, **_identity("sc"))
    for ds in (seg, sr, sc):
        ds.save_as(tmp_path / "x.dcm", enforce_file_format=True)
        assert b"synthetic demo" not in (tmp_path / "x.dcm").read_bytes()


def test_disclaimer_text_matches_the_model_package_label():
    from ai.modelpkg import DEMO_LABEL

    assert DEMO_DISCLAIMER == DEMO_LABEL


def test_same_inputs_and_uids_give_identical_files(written, tmp_path):
    sources, hu = make_ct_series(pixels=True)  # pixel data in the sources changes nothing
    result = make_result()
    seg = write_seg(sources, result, **_identity("seg"), content_datetime=WHEN)
    sr = write_sr(
        sources,
        seg,
        result,
        threshold=THRESHOLD,
        **_identity("sr"),
        selection_note="series 3: thinnest bone kernel",
        content_datetime=WHEN,
    )
    sc = write_summary(
        sources,
        hu,
        ct_affine(),
        result,
        threshold=THRESHOLD,
        **_identity("sc"),
        content_datetime=WHEN,
    )
    for name, ds in {"seg": seg, "sr": sr, "sc": sc}.items():
        path = tmp_path / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert path.read_bytes() == written["paths"][name].read_bytes(), name


def test_summary_image_shape_content_and_table(written):
    sc = pydicom.dcmread(written["paths"]["sc"])
    assert (sc.Rows, sc.Columns, sc.SamplesPerPixel) == SUMMARY_SHAPE
    assert sc.PhotometricInterpretation == "RGB" and sc.BitsAllocated == 8
    pixels = sc.pixel_array
    result, hu = written["result"], written["hu"]
    expected = render_summary(
        hu, ct_affine(), result, threshold=THRESHOLD, software_version="0.1.0"
    )
    np.testing.assert_array_equal(pixels, expected)
    assert pixels.dtype == np.uint8 and pixels.std() > 10
    # every segmented vertebra is drawn in its colour (labels in full colour)
    panels = pixels[:, :700].reshape(-1, 3)
    for name in ("C1", "C2", "C3", "C4", "C5", "C6"):
        assert (np.abs(panels.astype(int) - VERTEBRA_COLORS[name]).sum(axis=1) < 10).any(), name
    # the table depends on the probabilities; the reformat panels do not
    probs = dict(PROBS, C2=0.07)
    other = render_summary(hu, ct_affine(), make_result(probs=probs), threshold=THRESHOLD)
    differs = np.any(other != expected, axis=2)
    columns = np.flatnonzero(differs.any(axis=0))
    assert columns.size > 0 and columns.min() >= 2 * 340 + 20


def test_summary_reformat_keeps_physical_aspect_ratio():
    # a 16 mm (8 slices x 2 mm) by 16 mm (20 rows x 0.8 mm) block, black background
    hu = np.full((N_SLICES, ROWS, COLS), -1000, np.int16)
    result = make_result()
    result.label_map[:] = 0
    result.label_map[6:14, 20:40, 22:42] = 1
    image = render_summary(hu, ct_affine(), result, threshold=THRESHOLD)
    sagittal = image[48:, :350].astype(int)
    # the opaque outline is drawn in the exact colour on the nearest-neighbour label grid
    outline = np.all(sagittal == VERTEBRA_COLORS["C1"], axis=2)
    components, _ = ndimage.label(outline, structure=np.ones((3, 3)))
    largest = np.argmax(np.bincount(components.ravel())[1:]) + 1  # the block, not the text
    ys, xs = np.nonzero(components == largest)
    height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    assert height / width == pytest.approx(1.0, abs=0.03)
    assert height > 50  # scaled up into the panel
    # the central half of the block: the fill blended over black (edges are interpolated)
    y0, x0 = ys.min() + height // 4, xs.min() + width // 4
    inside = sagittal[y0 : y0 + height // 2, x0 : x0 + width // 2]
    expected = np.array(VERTEBRA_COLORS["C1"]) * OVERLAY_ALPHA
    assert np.abs(inside - expected).max() <= 2


def _bad(**changes):
    return dataclasses.replace(make_result(), **changes)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"result": _bad(label_map=np.zeros((N_SLICES - 1, ROWS, COLS), np.uint8))},
            "label_map shape",
        ),
        ({"result": _bad(label_map=np.full((N_SLICES, ROWS, COLS), 9, np.uint8))}, "0..7"),
        ({"result": _bad(patient_probability=1.5)}, "patient_probability"),
        ({"result": _bad(vertebrae=make_result().vertebrae[:6])}, "C1..C7"),
        ({"threshold": 1.0}, "open interval"),
        ({"threshold": 0.0}, "open interval"),
        ({"series_instance_uid": "not-a-uid"}, "valid DICOM UID"),
        ({"series_number": 0}, "series_number"),
        ({"sources_reversed": True}, "ascending"),
    ],
)
def test_writers_validate_eagerly(kwargs, message):
    sources, hu = make_ct_series(pixels=False)
    if kwargs.pop("sources_reversed", False):
        sources = sources[::-1]
    args = {"result": make_result(), "threshold": THRESHOLD, **_identity("sr"), **kwargs}
    result, threshold = args.pop("result"), args.pop("threshold")
    good_seg = write_seg(make_ct_series(pixels=False)[0], make_result(), **_identity("seg"))
    with pytest.raises(ValueError, match=message):
        write_sr(sources, good_seg, result, threshold=threshold, **args)
    with pytest.raises(ValueError, match=message):
        write_summary(sources, hu, ct_affine(), result, threshold=threshold, **args)
    if "threshold" not in kwargs:
        with pytest.raises(ValueError, match=message):
            write_seg(sources, result, **args)


def test_probability_outside_unit_interval_is_rejected():
    sources, _ = make_ct_series(pixels=False)
    result = make_result()
    result.vertebrae[1] = VertebraResult("C2", True, True, 1.2)
    with pytest.raises(ValueError, match=r"C2 must lie in \[0, 1\]"):
        write_seg(sources, result, **_identity("seg"))


def test_sr_must_reference_a_seg_of_the_same_result():
    sources, _ = make_ct_series(pixels=False)
    result = make_result()
    partial = make_result()
    partial.label_map[partial.label_map == 5] = 0
    seg = write_seg(sources, partial, **_identity("seg"))
    with pytest.raises(ValueError, match="no segment for vertebra"):
        write_sr(sources, seg, result, threshold=THRESHOLD, **_identity("sr"))


def test_seg_compares_with_the_highdicom_reference_example(real_data: Path):
    """Our SEG has the same top-level structure as highdicom's own CT SEG example."""
    reference = pydicom.dcmread(
        real_data / "ImagingDataCommons_highdicom" / "seg_image_ct_binary.dcm"
    )
    sources, _ = make_ct_series(pixels=False)
    ours = write_seg(sources, make_result(), **_identity("seg"))
    for keyword in ("SOPClassUID", "SegmentationType", "BitsAllocated", "Modality"):
        assert ours[keyword].value == reference[keyword].value
    ref_segment = reference.SegmentSequence[0]
    for keyword in ("SegmentedPropertyCategoryCodeSequence", "SegmentAlgorithmType"):
        assert keyword in ref_segment and keyword in ours.SegmentSequence[0]


@pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent:UserWarning")
def test_writers_on_real_ct_headers(real_data: Path, tmp_path):
    """Real GE CT slices (Implicit VR, full headers and pixels) -> SEG, SR, summary, all valid."""
    files = sorted((real_data / "QIICR_dcmqi" / "ct-3slice").glob("*.dcm"))
    sources = [pydicom.dcmread(f) for f in files]
    sources.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    rows, cols = int(sources[0].Rows), int(sources[0].Columns)
    hu = np.stack(
        [ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in sources]
    ).astype(np.int16)
    label_map = np.zeros((len(sources), rows, cols), np.uint8)
    label_map[:, 300:360, 230:290] = 7  # a box where the vertebral body is
    verdicts = [
        VertebraResult(
            n,
            n == "C7",
            n == "C7",
            0.2 if n == "C7" else None,
            None if n == "C7" else "outside field of view",
        )
        for n in VERTEBRAE
    ]
    result = PipelineResult(label_map, verdicts, 0.2, make_result().models)
    seg = write_seg(sources, result, **_identity("seg"))
    sr = write_sr(sources, seg, result, threshold=THRESHOLD, **_identity("sr"))
    affine = np.eye(4)
    spacing = [float(v) for v in sources[0].PixelSpacing]
    affine[:3, 0] = np.subtract(sources[1].ImagePositionPatient, sources[0].ImagePositionPatient)
    affine[:3, 1] = [0, spacing[0], 0]
    affine[:3, 2] = [spacing[1], 0, 0]
    sc = write_summary(sources, hu, affine, result, threshold=THRESHOLD, **_identity("sc"))
    for name, ds in {"seg": seg, "sr": sr, "sc": sc}.items():
        path = tmp_path / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        output = subprocess.run(
            ["dciodvfy", str(path)], capture_output=True, text=True, timeout=60, check=False
        )
        assert [
            line for line in (output.stdout + output.stderr).splitlines() if "Error" in line
        ] == [], name
        back = pydicom.dcmread(path)
        assert back.StudyInstanceUID == sources[0].StudyInstanceUID
        assert back.PatientID == sources[0].PatientID
    assert sources[0].SpecificCharacterSet == ""  # the caller's datasets are untouched
    seg_back = hd.seg.segread(tmp_path / "seg.dcm")
    pixels = seg_back.get_pixels_by_source_instance([ds.SOPInstanceUID for ds in sources])
    np.testing.assert_array_equal(pixels[..., 0] > 0, label_map == 7)
    values = read_sr_result(pydicom.dcmread(tmp_path / "sr.dcm"))
    assert values["C7"]["probability"] == pytest.approx(0.2)
    assert values["C7"]["segment_number"] == 1
    # one vertebra assessed: the patient's probability is inferred from a point
    report = hd.sr.srread(tmp_path / "sr.dcm").content
    (patient,) = report.get_image_measurement_groups(finding_site=codes.SCT.CervicalSpine)
    (probability,) = patient.get_measurements(name=PROBABILITY)
    (point,) = [i for i in probability[0].ContentSequence if i.ValueType == "SCOORD3D"]
    assert point.GraphicType == "POINT" and len(point.GraphicData) == 3
    assert values["C1"]["evaluation"] == "not assessed"


def test_sr_has_the_structure_of_the_dcmqi_tid1500_example(real_data: Path, written):
    """Read our SR and dcmqi's real TID 1500 example through the same highdicom accessors."""
    theirs = hd.sr.srread(real_data / "QIICR_dcmqi" / "sr-tid1500-headneck-petct" / "sr.dcm")
    ours = hd.sr.srread(written["paths"]["sr"])
    for report in (theirs.content, ours.content):
        assert report[0].ContentTemplateSequence[0].TemplateIdentifier == "1500"
        groups = report.get_volumetric_roi_measurement_groups()
        assert groups
        for group in groups:
            assert group.tracking_identifier and group.tracking_uid
            assert group.finding_type is not None
            assert group.reference_type == codes.DCM.ReferencedSegment
            assert group.referenced_segment[0].ReferencedSOPSequence[0].ReferencedSegmentNumber
        # every group carries a NUM, except our not-assessed C4 (probability None)
        with_num = [g.tracking_identifier for g in groups if g.get_measurements()]
        without = {g.tracking_identifier for g in groups} - set(with_num)
        assert without <= {"C4"}


def test_non_ascii_patient_name_keeps_its_character_set(tmp_path):
    sources, hu = make_ct_series(pixels=False, seed="utf8")
    for ds in sources:
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientName = "Müller^Jörg"
    result = make_result()
    seg = write_seg(sources, result, **_identity("seg"))
    outputs = {
        "seg": seg,
        "sr": write_sr(sources, seg, result, threshold=THRESHOLD, **_identity("sr")),
        "sc": write_summary(
            sources, hu, ct_affine(), result, threshold=THRESHOLD, **_identity("sc")
        ),
    }
    for name, ds in outputs.items():
        ds.save_as(tmp_path / f"{name}.dcm", enforce_file_format=True)
        back = pydicom.dcmread(tmp_path / f"{name}.dcm")
        assert back.SpecificCharacterSet == "ISO_IR 192", name
        assert str(back.PatientName) == "Müller^Jörg", name


def test_nothing_segmented_gives_an_sr_without_seg_and_a_summary(tmp_path):
    sources, hu = make_ct_series(pixels=False)
    result = make_result(probs=dict.fromkeys(VERTEBRAE))
    result.label_map[:] = 0
    result.patient_probability = None
    with pytest.raises(ValueError, match="no vertebra"):
        write_seg(sources, result, **_identity("seg"))
    sr = write_sr(sources, None, result, threshold=THRESHOLD, **_identity("sr"))
    sc = write_summary(sources, hu, ct_affine(), result, threshold=THRESHOLD, **_identity("sc"))
    for name, ds in {"sr": sr, "sc": sc}.items():
        path = tmp_path / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        output = subprocess.run(
            ["dciodvfy", str(path)], capture_output=True, text=True, timeout=60, check=False
        )
        assert [
            line for line in (output.stdout + output.stderr).splitlines() if "Error" in line
        ] == [], name
    values = read_sr_result(pydicom.dcmread(tmp_path / "sr.dcm"))
    assert {v["evaluation"] for v in values.values()} == {"not assessed"}
    assert all(v["segment_number"] is None for v in values.values())
    assert values["patient"]["probability"] is None
    assert values["patient"]["threshold"] == pytest.approx(THRESHOLD)


def test_missing_slice_thickness_falls_back_to_spacing_without_touching_sources():
    sources, _ = make_ct_series(pixels=False)
    for ds in sources:
        ds.SliceThickness = None  # type 2: present but empty
    del sources[0].SliceThickness
    seg = write_seg(sources, make_result(), **_identity("seg"))
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert float(measures.SliceThickness) == pytest.approx(SLICE_MM)
    assert "SliceThickness" not in sources[0] and sources[1].SliceThickness is None


# Type 2 and Type 3 attributes of the source headers that real CT leaves out or empty
# (e.g. the GE HiSpeed head series of dcm_qa_ct has no Patient's Birth Date or Sex).
# Removing or emptying any one of them must leave every writer working and its output
# as valid as the one written from complete headers.
OPTIONAL_SOURCE_ATTRIBUTES = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyDescription",
    "SeriesDate",
    "SeriesTime",
    "SeriesDescription",
    "SeriesNumber",
    "InstanceNumber",
    "Manufacturer",
    "BodyPartExamined",
    "PatientPosition",
    "SliceThickness",
    "AcquisitionNumber",
)
TYPE3_OUTPUT_ATTRIBUTES = ("PatientAge", "StudyDescription")


def _full_header_series(seed: str) -> tuple[list[Dataset], np.ndarray]:
    """``make_ct_series`` with every attribute of ``OPTIONAL_SOURCE_ATTRIBUTES`` set."""
    sources, hu = make_ct_series(pixels=False, seed=seed)
    for ds in sources:
        ds.PatientAge = "064Y"
        ds.StudyDescription = "CT CERVICAL SPINE"
        ds.SeriesDate, ds.SeriesTime = "20240101", "101700"
        ds.SeriesDescription = "C-SPINE BONE 1.0"
        ds.BodyPartExamined = "CSPINE"
        ds.PatientPosition = "HFS"
        ds.AcquisitionNumber = 1
    return sources, hu


def _write_all(sources: list[Dataset], hu: np.ndarray, out: Path) -> dict[str, Path]:
    """SEG, SR, summary image and not-processed SR from ``sources``, saved under ``out``."""
    return save_outputs(
        write_outputs(sources, hu, make_result(), reason="internal error (job 1)"), out
    )


def _dciodvfy_errors(path: Path) -> set[str]:
    proc = subprocess.run(
        ["dciodvfy", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    return {line.strip() for line in (proc.stdout + proc.stderr).splitlines() if "Error" in line}


@pytest.fixture(scope="module")
def complete_header_errors(tmp_path_factory) -> dict[str, set[str]]:
    """dciodvfy errors of each output written from complete source headers."""
    paths = _write_all(*_full_header_series("complete"), tmp_path_factory.mktemp("complete"))
    return {name: _dciodvfy_errors(path) for name, path in paths.items()}


@pytest.mark.parametrize("how", ["removed", "empty"])
@pytest.mark.parametrize("keyword", OPTIONAL_SOURCE_ATTRIBUTES)
def test_writers_accept_missing_or_empty_optional_source_attributes(
    keyword, how, complete_header_errors, tmp_path
):
    sources, hu = _full_header_series(keyword)
    for ds in sources:
        assert keyword in ds and ds[keyword].value not in (None, "")
        if how == "removed":
            del ds[keyword]
        else:
            ds[keyword].value = None
    paths = _write_all(sources, hu, tmp_path)
    for name, path in paths.items():
        new_errors = _dciodvfy_errors(path) - complete_header_errors[name]
        assert new_errors == set(), (name, new_errors)
        back = pydicom.dcmread(path)
        assert back.StudyInstanceUID == sources[0].StudyInstanceUID
        if keyword in TYPE2_OUTPUT_ATTRIBUTES:
            # Type 2: present, with an empty value
            assert keyword in back and back[keyword].value in (None, ""), (name, keyword)
        elif keyword in TYPE3_OUTPUT_ATTRIBUTES:
            assert keyword not in back, (name, keyword)  # Type 3: left out
        for other in TYPE2_OUTPUT_ATTRIBUTES:
            if other != keyword:  # the attributes the source has are copied as they are
                assert back[other].value == sources[0][other].value, (name, other)
    # the caller's datasets are untouched
    assert all((keyword in ds) == (how == "empty") for ds in sources)


@pytest.mark.parametrize(
    ("keyword", "value"),
    [("PatientSex", "U"), ("PatientBirthDate", "00000000"), ("StudyTime", "99")],
)
def test_writers_blank_type2_values_that_cannot_be_written(keyword, value, tmp_path):
    """A value outside its enumeration or an unparseable date is written empty, not fatal."""
    sources, hu = _full_header_series(f"bad-{keyword}")
    for ds in sources:
        ds[keyword].value = value
    paths = _write_all(sources, hu, tmp_path)
    for name, path in paths.items():
        assert _dciodvfy_errors(path) == set(), name
        back = pydicom.dcmread(path)
        assert back[keyword].value in (None, ""), name
    assert sources[0][keyword].value == value  # the caller's datasets are untouched


@pytest.mark.parametrize(
    "keyword", ["StudyInstanceUID", "SOPInstanceUID", "SOPClassUID", "SeriesInstanceUID"]
)
@pytest.mark.parametrize("how", ["removed", "empty"])
def test_writers_refuse_a_missing_type1_source_attribute(keyword, how):
    sources, hu = _full_header_series(f"type1-{keyword}")
    if how == "removed":
        del sources[0][keyword]
    else:
        sources[0][keyword].value = ""
    message = f"lacks required attribute.*{keyword}"
    with pytest.raises(ValueError, match=message):
        write_seg(sources, make_result(), **_identity("seg"))
    with pytest.raises(ValueError, match=message):
        write_summary(sources, hu, ct_affine(), make_result(), threshold=0.5, **_identity("sc"))
    with pytest.raises(ValueError, match=message):
        write_not_processed_sr(sources[:1], "reason", **_identity("np"))


def test_no_fracture_with_a_refused_vertebra_in_view_is_incomplete_not_absent():
    sources, _ = make_ct_series(pixels=False)
    base = make_result()
    low = [
        dataclasses.replace(v, probability=0.1) if v.assessed and v.probability else v
        for v in base.vertebrae
    ]
    # C4 refused as unlike the training data; every assessed level below the threshold
    low[3] = VertebraResult(
        "C4", True, False, None, "input unlike the training data (score 40.1, threshold 31.0)",
        "ood", 40.1,
    )  # fmt: skip
    result = dataclasses.replace(base, vertebrae=low, patient_probability=0.03)
    assert [v.label for v in result.incomplete] == ["C4"]
    seg = write_seg(sources, result, **_identity("seg"), content_datetime=WHEN)
    sr = write_sr(
        sources, seg, result, threshold=THRESHOLD, **_identity("sr"), content_datetime=WHEN
    )
    patient = read_sr_result(sr)["patient"]
    assert patient["evaluation"] == "not assessed" and patient["probability"] == 0.03
    assert any(
        c.startswith("not assessed: incomplete: no fracture in the assessed levels; C4 not")
        for c in patient["comments"]
    ), patient
    assert read_sr_result(sr)["C4"]["reason"].startswith("input unlike the training data")
    # a fracture found among the assessed levels stays a fracture
    high = dataclasses.replace(result, patient_probability=0.9)
    sr = write_sr(sources, seg, high, threshold=THRESHOLD, **_identity("sr"), content_datetime=WHEN)
    assert read_sr_result(sr)["patient"]["evaluation"] == "present"


@pytest.mark.parametrize(("charset", "expected"), [("ISO 2022 IR 100", "ISO_IR 100"), ("", None)])
def test_a_single_code_extension_charset_is_written_as_its_plain_term(charset, expected):
    sources, hu = make_ct_series()
    for ds in sources:
        ds.SpecificCharacterSet = charset
        if expected:
            ds.PatientName = "Müller^Jürgen"
    for ds in write_outputs(sources, hu, make_result()).values():
        assert ds.get("SpecificCharacterSet") == expected
        if expected:
            assert str(ds.PatientName) == "Müller^Jürgen"
    assert sources[0].SpecificCharacterSet == charset  # the sources are not changed


def test_a_rectangular_outline_gets_its_edge_midpoints():
    """A segment whose slice outline is a plain rectangle is written with nine vertices
    (OHIF takes a closed 4- or 5-point polyline for its own rectangle tool and fails)."""
    from dicom_node.writers.sr import _with_edge_midpoints

    square = _outline(np.pad(np.ones((2, 3), bool), 1))
    assert len(square) == 5
    nine = _with_edge_midpoints(square)
    assert len(nine) == 9 and (nine[0] == nine[-1]).all()
    assert nine[::2].tolist() == square.tolist()
    assert nine[1].tolist() == ((square[0] + square[1]) / 2).tolist()
    notched = _outline(np.pad(np.array([[1, 1, 1], [1, 0, 1], [1, 1, 1], [1, 1, 0]], bool), 1))
    assert _with_edge_midpoints(notched) is notched
