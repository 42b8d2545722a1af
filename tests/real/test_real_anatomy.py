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
from ai.real_anatomy import OPENKBP_CORD, evaluate_folder, measure, nifti_mask, nifti_volume
from ai.types import VERTEBRAE

OPENKBP = Path("ababier_open-kbp")
NEGATIVES = (
    Path("wasserth_TotalSegmentator/example_ct.nii.gz"),  # abdomen-pelvis, T11-S1
    Path("Hendrik-code_TPTBox/sample_ct/sub-ct_label-22_ct.nii.gz"),  # lumbar L2-L4
    Path("neurolabusc_dcm_qa_ct/GE_HiSpeed_head_gantry_tilt"),  # head only, C1 at most
)


@pytest.fixture(scope="module")
def pipeline() -> Pipeline:
    return Pipeline.load(device="cpu")


@pytest.fixture(scope="module")
def label_maps() -> dict[bytes, np.ndarray]:
    """Label maps already computed in this module, by volume (shape, affine, voxels)."""
    return {}


def _key(vol) -> bytes:
    return repr(vol.hu.shape).encode() + vol.affine.tobytes() + vol.hu[::7, ::7, ::7].tobytes()


@pytest.mark.parametrize("case", [f"pt_{n}" for n in (
    4, 13, 20, 24, 54, 60, 61, 66, 72, 87, 112, 114, 132, 140, 146, 168, 282, 286, 304,
    307, 312, 332, 338)])  # fmt: skip
def test_openkbp_reported_vertebrae_sit_on_the_cord_and_get_no_fracture_call(
    real_data, pipeline, label_maps, case
):
    vol = nifti_volume(real_data / OPENKBP / "ct" / f"{case}_ct.nii.gz")
    result = pipeline.run(vol)
    label_maps[_key(vol)] = result.label_map  # the folder report below reuses it
    cord = nifti_mask(
        real_data / OPENKBP / "structures" / f"{case}_structures.nii.gz", OPENKBP_CORD
    )
    placed = measure(case, result.label_map, cord, vol.affine)
    assert [f"{lv.level}: {lv.why}" for lv in placed.levels if not lv.ok] == []
    assert placed.in_order
    assert result.patient_probability is None or result.patient_probability < 0.5
    assert all(v.probability is None or v.probability < 0.5 for v in result.vertebrae)
    reported = [i for i, v in enumerate(VERTEBRAE) if np.any(result.label_map == i + 1)]
    if reported:
        for v in result.vertebrae[reported[0] : reported[-1] + 1]:
            assert v.reason_code != "not_in_fov", (case, v)
    # these 3.8-5.1 mm series are outside stage 2's intended use whatever stage 1 finds
    if result.not_processed is None:
        assert any(f.stage == "stage2" for f in result.findings)


def test_the_body_measure_passes_a_spine_in_front_of_the_cord_and_fails_one_out_of_order():
    cord = np.zeros((70, 60, 60), bool)
    cord[:, 36:40, 28:32] = True
    affine = np.array([[0, 0, 1.0, 0], [0, 1.0, 0, 0], [2.0, 0, 0, 0], [0, 0, 0, 1.0]])
    spine = np.zeros(cord.shape, np.uint8)
    for level in range(7):  # C1 on top: highest slices
        k = 62 - 9 * level
        spine[k - 3 : k + 3, 14:34, 22:38] = level + 1  # body 2-22 mm before the cord
    good = measure("toy", spine, cord, affine)
    assert good.passed and good.found == 7 and good.in_order, good.note
    assert all(5 <= lv.anterior_mm <= 45 and lv.lateral_mm < 1 for lv in good.levels)
    swapped = spine.copy()
    swapped[spine == 1], swapped[spine == 7] = 7, 1
    bad = measure("toy", swapped, cord, affine)
    assert not bad.passed and "out of craniocaudal order" in bad.note


@pytest.fixture(scope="module")
def anatomy_report(real_data, pipeline, label_maps) -> dict:
    """What the node reports on the OpenKBP necks and the non-cervical CTs (gate on)."""

    def predict(vol):
        known = label_maps.get(_key(vol))
        return pipeline.run(vol).label_map if known is None else known

    return evaluate_folder(
        real_data / OPENKBP,
        predict,
        negatives=[real_data / n for n in NEGATIVES],
    )


def test_no_voxel_is_labelled_cervical_on_the_abdomen_lumbar_and_head_ct(anatomy_report):
    assert [(n["file"].split("/")[-1], n["c1_c7_voxels"]) for n in anatomy_report["negatives"]] == [
        (Path(n).name, 0) for n in NEGATIVES
    ]


@pytest.mark.xfail(
    strict=True,
    reason="issue #17 target not met by seg-demo 3.0.0 (synthetic demo weights): "
    "0 of 23 OpenKBP studies pass with the gate on (2 of 23 raw: `cspine evaluate anatomy "
    "--no-gate`); the target is 90 %",
)
def test_at_least_90_percent_of_real_necks_show_6_levels_in_front_of_the_cord(anatomy_report):
    assert anatomy_report["pass_rate"] >= 0.9, anatomy_report["passed"]
