"""Stage 1 on 23 real head-and-neck CTs (OpenKBP), judged by their spinal-cord contours.

No vertebra labels exist for these patients, but their spinal cord is contoured: a
vertebral body lies anterior of the cord, near its left-right position. Whatever the
pipeline reports as a vertebra (voxels left in its label map after the plausibility
checks) must sit there, in craniocaudal order, with no level between two reported ones
called "not in the field of view", and no case may get a fracture call.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ai.pipeline import Pipeline
from ai.types import VERTEBRAE, CTVolume
from tests.real.nifti_series import lps_grid

OPENKBP = Path("ababier_open-kbp")
SPINAL_CORD = 102
TO_KJI = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1.0]])
"""Voxel (k, j, i) of a ``CTVolume`` is voxel (i, j, k) of :func:`lps_grid`."""


def _volume(path: Path) -> CTVolume:
    hu, affine = lps_grid(path)
    return CTVolume(
        hu=np.ascontiguousarray(np.transpose(hu, (2, 1, 0))).astype(np.int16),
        affine=affine @ TO_KJI,
    )


def misplaced_levels(label_map: np.ndarray, cord: np.ndarray, affine: np.ndarray) -> list[str]:
    """Levels whose centroid is not anterior of the cord or lies over 20 mm beside it.

    ``cord`` is a boolean mask on the label map's grid; ``affine`` maps (k, j, i) to LPS.
    """
    bad = []
    for value, name in enumerate(VERTEBRAE, start=1):
        idx = np.argwhere(label_map == value)
        if idx.size == 0:
            continue
        c = idx.mean(axis=0)
        k = int(np.rint(c[0]))
        at = np.argwhere(cord[k])
        if at.size == 0:
            bad.append(f"{name}: no cord at its level")
            continue
        centre = (affine @ np.r_[c, 1.0])[:3]
        cord_c = (affine @ np.r_[k, at.mean(axis=0), 1.0])[:3]
        if not centre[1] < cord_c[1]:  # LPS: +y is posterior
            bad.append(f"{name}: {centre[1] - cord_c[1]:.0f} mm posterior of the cord")
        elif abs(centre[0] - cord_c[0]) > 20.0:
            bad.append(f"{name}: {abs(centre[0] - cord_c[0]):.0f} mm beside the cord")
    return bad


def test_the_cord_check_tells_a_body_in_front_from_one_behind():
    cord = np.zeros((40, 60, 60), bool)
    cord[:, 30:34, 28:32] = True  # rows run anterior -> posterior
    # (k, j, i) -> LPS: slices 2 mm apart along z, rows along y, columns along x
    affine = np.array([[0, 0, 1.0, 0], [0, 1.0, 0, 0], [2.0, 0, 0, 0], [0, 0, 0, 1.0]])
    front = np.zeros(cord.shape, np.uint8)
    front[10:20, 12:24, 24:36] = 3  # anterior of the cord: C3
    assert misplaced_levels(front, cord, affine) == []
    behind = np.zeros(cord.shape, np.uint8)
    behind[10:20, 40:50, 24:36] = 3
    assert misplaced_levels(behind, cord, affine) == ["C3: 13 mm posterior of the cord"]
    aside = np.zeros(cord.shape, np.uint8)
    aside[10:20, 12:24, 54:60] = 3
    assert misplaced_levels(aside, cord, affine)[0].startswith("C3: 27 mm beside")


@pytest.fixture(scope="module")
def pipeline() -> Pipeline:
    return Pipeline.load(device="cpu")


@pytest.mark.parametrize("case", [f"pt_{n}" for n in (
    4, 13, 20, 24, 54, 60, 61, 66, 72, 87, 112, 114, 132, 140, 146, 168, 282, 286, 304,
    307, 312, 332, 338)])  # fmt: skip
def test_openkbp_reported_vertebrae_sit_on_the_cord_and_get_no_fracture_call(
    real_data, pipeline, case
):
    vol = _volume(real_data / OPENKBP / "ct" / f"{case}_ct.nii.gz")
    result = pipeline.run(vol)
    structures, _ = lps_grid(real_data / OPENKBP / "structures" / f"{case}_structures.nii.gz")
    cord = np.transpose(structures == SPINAL_CORD, (2, 1, 0))
    assert misplaced_levels(result.label_map, cord, vol.affine) == []
    assert result.patient_probability is None or result.patient_probability < 0.5
    assert all(v.probability is None or v.probability < 0.5 for v in result.vertebrae)
    reported = [i for i, v in enumerate(VERTEBRAE) if np.any(result.label_map == i + 1)]
    if reported:
        for v in result.vertebrae[reported[0] : reported[-1] + 1]:
            assert v.reason_code != "not_in_fov", (case, v)
    # these 3.8-5.1 mm series are outside stage 2's intended use whatever stage 1 finds
    if result.not_processed is None:
        assert any(f.stage == "stage2" for f in result.findings)
