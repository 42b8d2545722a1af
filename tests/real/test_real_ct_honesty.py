"""Real CT without a (findable) cervical spine, and a real neck, through the running node.

Each real NIfTI CT is written as an axial DICOM series with its patient-space geometry
(:mod:`tests.real.nifti_series`), sent by C-STORE to ``cspine serve`` with the shipped
models, and the results are read where a PACS sees them: the delivered SR and SEG.

Expected outcomes (what the node must never do is the point):

* abdomen-pelvis (TotalSegmentator example, T11-S1 in view) and a lumbar crop (TPTBox,
  L2-L4): no segment labelled with a cervical level, no fracture call, and the study not
  processed ("no cervical spine found") or every level not assessed with a reason;
* OpenKBP pt_146 (head and neck, no known fracture): no FRACTURE call at the threshold;
  every vertebra that is reported lies where the spinal-cord contour says a vertebral body
  can be (anterior of the cord, near its left-right position, in craniocaudal order); a
  level between two reported levels is never "not in the field of view".
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from dicom_node.writers import read_sr_result
from tests.conftest import free_port
from tests.dicom_node.pacs import LoopbackPACS
from tests.dicom_node.proc import Server, cspine
from tests.real.nifti_series import lps_grid, write_nifti_series

SEG, SR = "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.88.34"
CASES = {
    "abdomen": Path("wasserth_TotalSegmentator/example_ct.nii.gz"),
    "lumbar": Path("Hendrik-code_TPTBox/sample_ct/sub-ct_label-22_ct.nii.gz"),
    "pt_146": Path("ababier_open-kbp/ct/pt_146_ct.nii.gz"),
}
CORD = Path("ababier_open-kbp/structures/pt_146_structures.nii.gz")
SPINAL_CORD = 102
LEVELS = ("C1", "C2", "C3", "C4", "C5", "C6", "C7")


def _counts(status: str) -> dict[str, int]:
    line = next(line for line in status.splitlines() if line.startswith("jobs:"))
    return {state: int(n) for state, n in re.findall(r"([A-Z_]+) (\d+)", line)}


@pytest.fixture(scope="module")
def delivered(real_data, tmp_path_factory):
    """Send the three cases; ``{case: {"sr": [...], "seg": [...], "results": text}}``."""
    root = tmp_path_factory.mktemp("real-ct")
    study_of: dict[str, str] = {}
    folders = {}
    for case, rel in CASES.items():
        files = write_nifti_series(real_data / rel, root / case, description=f"real {case}")
        study_of[case] = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        folders[case] = root / case
    pacs = LoopbackPACS().start()
    port = free_port()
    data = root / "var"
    server = Server(data, port, "--stable-seconds", "2", "--destination", pacs.spec).start()
    try:
        for case, folder in folders.items():
            sent = cspine("send", str(folder), "--to", f"CSPINE@127.0.0.1:{port}")
            assert sent.returncode == 0, f"{case}: {sent.stdout}{sent.stderr}"
        deadline = time.monotonic() + 300
        status = ""
        while time.monotonic() < deadline:
            status = cspine("status", "--data-dir", str(data)).stdout
            counts = _counts(status)
            finished = sum(counts.get(s, 0) for s in ("DONE", "NOT_PROCESSED", "FAILED"))
            if finished == len(CASES) and "PENDING 0" in status:
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"jobs not finished:\n{status}\n{server.log()[-4000:]}")
        assert _counts(status).get("FAILED", 0) == 0, status + server.log()[-4000:]
        results = {
            case: cspine("results", uid, "--data-dir", str(data)).stdout
            for case, uid in study_of.items()
        }
        log = server.log()
    finally:
        server.stop()
        pacs.stop()
    out: dict[str, dict] = {}
    for case, uid in study_of.items():
        mine = [ds for ds in pacs.received if str(ds.StudyInstanceUID) == uid]
        out[case] = {
            "sr": [ds for ds in mine if str(ds.SOPClassUID) == SR],
            "seg": [ds for ds in mine if str(ds.SOPClassUID) == SEG],
            "results": results[case],
        }
    out["_log"] = log
    return out


def _segment_labels(seg_datasets) -> list[str]:
    labels = []
    for ds in seg_datasets:
        labels += [str(item.SegmentLabel) for item in ds.SegmentSequence]
    return labels


def _sr(case: dict) -> dict[str, dict[str, object]]:
    (sr,) = case["sr"]  # exactly one SR per study, whatever the outcome
    return read_sr_result(sr)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["abdomen", "lumbar"])
def test_no_cervical_spine_is_said_so_and_nothing_is_labelled_cervical(delivered, name):
    case = delivered[name]
    assert not [s for s in _segment_labels(case["seg"]) if s in LEVELS], name
    groups = _sr(case)
    assert all(g["evaluation"] != "present" for g in groups.values()), groups
    assert all(g["probability"] is None for g in groups.values() if g["threshold"] is None)
    if "study not processed" in groups:
        reason = str(groups["study not processed"]["reason"])
        assert reason.startswith(("no cervical spine found", "input outside intended use")), reason
        assert "not processed: " in case["results"]
    else:  # processed: then every level is not assessed, each with its reason
        for level in LEVELS:
            assert groups[level]["evaluation"] == "not assessed" and groups[level]["reason"]


def _centroids_lps(seg_ds) -> dict[str, np.ndarray]:
    seg = hd.seg.Segmentation.from_dataset(seg_ds, copy=True)
    out = {}
    for item in seg_ds.SegmentSequence:
        number, label = int(item.SegmentNumber), str(item.SegmentLabel)
        points = []
        for frame_index, frame in enumerate(seg_ds.PerFrameFunctionalGroupsSequence):
            ref = int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
            if ref != number:
                continue
            position = np.array(frame.PlanePositionSequence[0].ImagePositionPatient, float)
            pixels = seg.pixel_array[frame_index] if seg.pixel_array.ndim == 3 else seg.pixel_array
            rows, cols = np.nonzero(pixels)
            if rows.size == 0:
                continue
            iop = np.array(seg_ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
                           .ImageOrientationPatient, float)  # fmt: skip
            spacing = np.array(
                seg_ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing,
                float,
            )
            pts = (
                position
                + np.outer(cols * spacing[1], iop[:3])
                + np.outer(rows * spacing[0], iop[3:])
            )
            points.append(pts)
        if points:
            out[label] = np.concatenate(points).mean(axis=0)
    return out


@pytest.mark.slow
def test_real_neck_gets_no_fracture_call_and_reported_levels_sit_on_the_cord(delivered, real_data):
    case = delivered["pt_146"]
    groups = _sr(case)
    assert all(g["evaluation"] != "present" for g in groups.values()), groups
    if "study not processed" not in groups:
        reported = [v for v in LEVELS if groups[v]["evaluation"] != "not assessed"
                    or groups[v]["segment_number"] is not None]  # fmt: skip
        idx = [LEVELS.index(v) for v in reported]
        for level in LEVELS[min(idx, default=0) : max(idx, default=-1) + 1]:
            assert groups[level]["reason"] != "not in the field of view", (level, groups)
    centroids = {}
    for seg in case["seg"]:
        centroids.update(_centroids_lps(seg))
    if not centroids:
        return  # nothing reported as a vertebra: nothing can sit in the wrong place
    cord, affine = lps_grid(real_data / CORD)
    cord_mask = cord == SPINAL_CORD
    zs = []
    for label, c in sorted(centroids.items(), key=lambda kv: LEVELS.index(kv[0])):
        k = int(np.rint(np.linalg.solve(affine[:3, :3], c - affine[:3, 3])[2]))
        ii, jj = np.nonzero(cord_mask[:, :, k])
        assert ii.size, f"{label} at a level without spinal cord"
        cord_pt = (affine @ np.array([ii.mean(), jj.mean(), k, 1.0]))[:3]
        assert c[1] < cord_pt[1], f"{label} is not anterior of the cord"
        assert abs(c[0] - cord_pt[0]) < 20.0, f"{label} is {abs(c[0] - cord_pt[0]):.0f} mm aside"
        zs.append(c[2])
    assert zs == sorted(zs, reverse=True), "reported levels out of craniocaudal order"


@pytest.mark.slow
def test_results_say_why_and_logs_hold_no_patient_name(delivered):
    for name in CASES:
        text = delivered[name]["results"]
        assert "not processed: " in text or "not assessed: " in text or "no fracture" in text
    assert "REAL^CT^TEST" not in delivered["_log"]
