"""Independent readers: dcmqi (QIICR) reads the node's SEG and SR, and finds our values.

``segimage2itkimage`` turns the SEG into one NIfTI volume per segment plus a JSON of
segment attributes; ``tid1500reader`` turns the TID 1500 SR into JSON. Both come from the
``dcmqi`` wheel (test extra). The SEG and SR are written by the node's writers for the
small synthetic study of ``test_writers``; the NIfTI voxels are compared with our label
map in patient coordinates, so a reader that put a segment elsewhere would fail.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from ai.types import VERTEBRAE
from dicom_node.writers import VERTEBRA_CODES, VERTEBRA_COLORS, segment_numbers
from tests.dicom_node.test_writers import (
    PIXEL_MM,
    PROBS,
    SLICE_MM,
    THRESHOLD,
    make_ct_series,
    make_result,
    save_outputs,
    write_outputs,
)

ORIGIN = np.array([-25.6, -30.0, -80.0])
"""Image Position (Patient) of the first slice of ``make_ct_series`` (LPS, mm)."""


def _tool(name: str) -> str:
    """Path of a dcmqi binary: next to this interpreter (the venv), else on PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    assert found, f"{name} not found: install the test extra (pip install -e '.[test]')"
    return found


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> dict[str, object]:
    """The node's SEG and SR for the synthetic study, and what dcmqi makes of them."""
    out = tmp_path_factory.mktemp("dcmqi")
    sources, hu = make_ct_series(pixels=False, seed="dcmqi")
    result = make_result()
    outputs = write_outputs(sources, hu, result)
    paths = save_outputs({k: outputs[k] for k in ("seg", "sr", "np")}, out)
    seg_dir = out / "seg"
    seg_dir.mkdir()
    _run(
        _tool("segimage2itkimage"),
        "--inputDICOM",
        str(paths["seg"]),
        "--outputDirectory",
        str(seg_dir),
        "-t",
        "nii",
    )
    for name in ("sr", "np"):
        _run(
            _tool("tid1500reader"),
            "--inputDICOM",
            str(paths[name]),
            "--outputMetadata",
            str(out / f"{name}.json"),
        )
    return {
        "result": result,
        "seg": pydicom.dcmread(paths["seg"]),
        "seg_dir": seg_dir,
        "sr": json.loads((out / "sr.json").read_text()),
        "np": json.loads((out / "np.json").read_text()),
    }


def _segment_attributes(seg_dir: Path) -> dict[str, dict]:
    """Segment label -> dcmqi's segment attributes (one list per output file)."""
    meta = json.loads((seg_dir / "meta.json").read_text())
    return {a["SegmentLabel"]: a for group in meta["segmentAttributes"] for a in group}


def _world_lps(img: nib.Nifti1Image) -> set[tuple[float, float, float]]:
    """Patient (LPS) coordinates, rounded to 0.1 mm, of the non-zero voxels of ``img``."""
    ijk = np.argwhere(np.asarray(img.dataobj) != 0)
    ras = nib.affines.apply_affine(img.affine, ijk)
    lps = ras * np.array([-1.0, -1.0, 1.0])
    return {tuple(p) for p in np.round(lps, 1)}


def _our_world_lps(label_map: np.ndarray, value: int) -> set[tuple[float, float, float]]:
    """Same for our label map [slice, row, column] on the axial grid of make_ct_series."""
    k, r, c = np.nonzero(label_map == value)
    lps = ORIGIN + np.stack([c * PIXEL_MM, r * PIXEL_MM, k * SLICE_MM], axis=1)
    return {tuple(p) for p in np.round(lps, 1)}


def test_segimage2itkimage_reads_our_segments_with_their_codes_and_colours(study):
    seg = study["seg"]
    attributes = _segment_attributes(study["seg_dir"])
    numbers = segment_numbers(seg)
    assert set(attributes) == set(numbers) == {"C1", "C2", "C3", "C4", "C5", "C6"}
    tracking = {str(s.SegmentLabel): str(s.TrackingUID) for s in seg.SegmentSequence}
    for label, attr in attributes.items():
        assert attr["labelID"] == numbers[label]
        assert attr["TrackingIdentifier"] == label
        assert attr["TrackingUniqueIdentifier"] == tracking[label]
        assert attr["SegmentAlgorithmType"] == "AUTOMATIC"
        code = attr["SegmentedPropertyTypeCodeSequence"]
        assert (code["CodeValue"], code["CodingSchemeDesignator"]) == (
            VERTEBRA_CODES[label].value,
            "SCT",
        )
        assert attr["AnatomicRegionSequence"]["CodeValue"] == "122494005"
        # the Recommended Display CIELab value converted back by dcmqi is our sRGB colour
        assert attr["recommendedDisplayRGBValue"] == list(VERTEBRA_COLORS[label])


def test_segimage2itkimage_puts_every_segment_where_our_label_map_has_it(study):
    label_map = study["result"].label_map
    numbers = segment_numbers(study["seg"])
    for label, number in numbers.items():
        img = nib.load(study["seg_dir"] / f"{number}.nii.gz")
        assert np.allclose(np.abs(np.diag(img.affine)[:3]), [PIXEL_MM, PIXEL_MM, SLICE_MM])
        theirs = _world_lps(img)
        ours = _our_world_lps(label_map, VERTEBRAE.index(label) + 1)
        assert ours, label
        assert theirs == ours, label


def _evaluates(group: dict) -> bool:
    """Whether the group holds a fracture verdict (a TID 1411 or 1501 group)."""
    return any(
        q["conceptCode"]["CodeValue"] == "125605004" for q in group["qualitativeEvaluations"]
    )


def _measurements(report: dict) -> dict[str, dict]:
    """Tracking identifier -> the group that holds the finding's values."""
    return {m["TrackingIdentifier"]: m for m in report["Measurements"] if _evaluates(m)}


def _placements(report: dict) -> dict[str, dict]:
    """Tracking identifier -> the TID 1410 group that locates a finding: a vertebra's
    outline on a CT slice, or the field of view examined for a finding without a place
    (dcmqi reads its finding, site and tracking UID; it skips the SCOORD/SCOORD3D)."""
    return {m["TrackingIdentifier"]: m for m in report["Measurements"] if not _evaluates(m)}


def _values(group: dict) -> dict[str, float]:
    return {i["quantity"]["CodeMeaning"]: float(i["value"]) for i in group["measurementItems"]}


def _evaluation(group: dict) -> str:
    (fracture,) = [
        q["conceptValue"]["CodeMeaning"]
        for q in group["qualitativeEvaluations"]
        if q["conceptCode"]["CodeValue"] == "125605004"
    ]
    return fracture


def test_tid1500reader_reads_our_probabilities_verdicts_and_segment_links(study):
    report, seg = study["sr"], study["seg"]
    assert report["VerificationFlag"] == "UNVERIFIED"
    assert report["CompletionFlag"] == "COMPLETE"
    assert report["observerContext"]["ObserverType"] == "DEVICE"
    assert report["compositeContext"] == [seg.SOPInstanceUID]
    groups = _measurements(report)
    assert set(groups) == {*VERTEBRAE, "patient"}
    placements = _placements(report)
    assert len(report["Measurements"]) == len(groups) + len(placements)
    numbers = segment_numbers(seg)
    tracking = {str(s.SegmentLabel): str(s.TrackingUID) for s in seg.SegmentSequence}
    for label in VERTEBRAE:
        group = groups[label]
        assert group["FindingSite"]["CodeValue"] == VERTEBRA_CODES[label].value
        assert group["Finding"]["CodeValue"] == "125605004"
        p = PROBS[label]
        if p is None:
            assert _values(group) == {}
            assert _evaluation(group) == "Not Evaluated"
        else:
            assert _values(group) == {"Probability": pytest.approx(p)}
            assert _evaluation(group) == ("Present" if p >= THRESHOLD else "Absent")
            assert group["measurementItems"][0]["units"]["CodeValue"] == "{probability}"
        if label in numbers:  # a TID 1411 group pointing at its SEG segment
            assert group["ReferencedSegment"] == numbers[label]
            assert group["segmentationSOPInstanceUID"] == seg.SOPInstanceUID
            assert group["TrackingUniqueIdentifier"] == tracking[label]
            # and a TID 1410 group of the same finding: its outline on a CT slice, no values
            placement = placements.pop(label)
            assert placement["TrackingUniqueIdentifier"] == tracking[label]
            assert placement["FindingSite"] == group["FindingSite"]
            assert placement["Finding"]["CodeValue"] == "125605004"
            assert placement["measurementItems"] == []
        else:
            assert "ReferencedSegment" not in group
        algorithm = group["measurementAlgorithmIdentification"]
        assert algorithm["AlgorithmName"] == "seg-demo+cls-demo"
        assert algorithm["AlgorithmVersion"] == "1.0.0+1.2.0"
        # dcmqi keeps the first Algorithm Parameters item only (we write three)
        assert algorithm["AlgorithmParameters"][0] == f"threshold={THRESHOLD:g}"
    # C7, without voxels: its TID 1410 group locates it at the field of view examined
    assert list(placements) == ["C7"], f"placements without a TID 1411 group: {placements}"
    c7 = placements["C7"]
    assert c7["TrackingUniqueIdentifier"] == groups["C7"]["TrackingUniqueIdentifier"]
    assert c7["FindingSite"] == groups["C7"]["FindingSite"]
    assert c7["measurementItems"] == []
    patient = groups["patient"]
    assert _values(patient) == {
        "Probability": pytest.approx(study["result"].patient_probability),
        "Threshold Value": pytest.approx(THRESHOLD),
    }
    assert _evaluation(patient) == "Present"


def test_tid1500reader_reads_the_not_processed_sr(study):
    groups = _measurements(study["np"])
    assert set(groups) == {"study not processed"}
    group = groups["study not processed"]
    assert _values(group) == {}
    assert _evaluation(group) == "Not Evaluated"
    texts = [q["conceptValue"] for q in group["qualitativeEvaluations"]]
    assert any(isinstance(t, str) and t.startswith("not processed: ") for t in texts)
    # and the TID 1410 group that locates it at the field of view of its CT slice
    (located,) = _placements(study["np"]).values()
    assert located["TrackingUniqueIdentifier"] == group["TrackingUniqueIdentifier"]
    assert located["measurementItems"] == []
