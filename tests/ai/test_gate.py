"""The intended-use gate and the plausibility checks, on synthetic volumes with known truth."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

from ai import pipeline, plausibility
from ai.errors import ModelLoadError
from ai.intended_use import IntendedUse, from_package, measure
from ai.synthetic import StudySpec, generate_study
from ai.types import VERTEBRAE, CTVolume, GeometryIssue, SeriesFacts
from tests.helpers import STAGE2_READY

STAGE2 = {
    "stage": "stage2",
    "summary": "test",
    "in_plane_spacing_mm": [0.2, 1.0],
    "slice_spacing_mm": [0.3, 1.25],
    "slice_thickness_mm": [0.3, 1.25],
    "max_tilt_deg": 5.0,
    "min_coverage_mm": 40.0,
    "kernel_refused": ["SOFT", "STANDARD", "B3"],
    "contrast": "any",
}


def _volume(shape=(100, 64, 64), spacing=(1.0, 0.5, 0.5), **facts) -> CTVolume:
    affine = np.eye(4)
    affine[:3, 0] = [0, 0, spacing[0]]  # slices along +z
    affine[:3, 1] = [0, spacing[1], 0]  # rows along +y
    affine[:3, 2] = [spacing[2], 0, 0]  # columns along +x
    return CTVolume(hu=np.zeros(shape, np.int16), affine=affine, facts=SeriesFacts(**facts))


def test_within_limits_no_finding_and_each_limit_names_value_and_limit():
    use = IntendedUse.from_dict(STAGE2, "stage2")
    assert use.check(_volume(slice_thickness=1.0, convolution_kernel="BONE")) == []
    cases = {
        "slice_thickness": (_volume(slice_thickness=3.0), "slice thickness 3.00 mm > 1.25 mm"),
        "slice_spacing": (_volume(spacing=(2.5, 0.5, 0.5)), "slice spacing 2.50 mm > 1.25 mm"),
        "in_plane_spacing": (
            _volume(spacing=(1.0, 1.5, 1.5)),
            "in-plane pixel spacing 1.50 mm > 1 mm",
        ),
        "coverage": (_volume(shape=(20, 64, 64)), "craniocaudal coverage 19 mm < 40 mm"),
        "kernel": (
            _volume(convolution_kernel="B30f"),
            "reconstruction kernel 'B30f' is a soft-tissue kernel",
        ),
    }
    for check, (vol, message) in cases.items():
        (finding,) = use.check(vol)
        assert (finding.code, finding.stage, finding.check) == (
            "outside_intended_use",
            "stage2",
            check,
        )
        assert finding.message == message
        assert finding.text == f"input outside intended use ({message})"


def test_tilt_and_missing_slices_are_outside():
    use = IntendedUse.from_dict(STAGE2, "stage2")
    tilted = _volume()
    angle = np.radians(18.5)
    tilted.affine[:3, 0] = [0, np.sin(angle), np.cos(angle)]  # stacked off the normal
    assert round(measure(tilted).tilt_deg, 1) == 18.5
    assert [f.check for f in use.check(tilted)] == ["orientation"]
    gappy = _volume()
    gappy.issues.append(GeometryIssue("gap", "missing slices"))
    assert [f.check for f in use.check(gappy)] == ["slice_spacing"]


def test_bad_limits_are_refused_with_the_constraint():
    with pytest.raises(ValueError, match=r"slice_spacing_mm must be \[low, high\]"):
        IntendedUse.from_dict({**STAGE2, "slice_spacing_mm": 1.0}, "stage2")
    with pytest.raises(ValueError, match="0 <= low <= high"):
        IntendedUse.from_dict({**STAGE2, "slice_spacing_mm": [2, 1]}, "stage2")
    with pytest.raises(ValueError, match="is for 'stage2', expected 'stage1'"):
        IntendedUse.from_dict(STAGE2, "stage1")
    with pytest.raises(ValueError, match="contrast must be one of"):
        IntendedUse.from_dict({**STAGE2, "contrast": "maybe"}, "stage2")


def test_a_site_may_narrow_but_never_widen():
    use = IntendedUse.from_dict(STAGE2, "stage2")
    narrow = use.narrowed({"slice_thickness_mm": [0.5, 1.0], "kernel_refused": ["SMOOTH"]})
    assert narrow.slice_thickness_mm == (0.5, 1.0)
    assert narrow.kernel_refused[-1] == "SMOOTH" and "SOFT" in narrow.kernel_refused
    assert [f.check for f in narrow.check(_volume(slice_thickness=1.2))] == ["slice_thickness"]
    with pytest.raises(ValueError, match="would widen the model's"):
        use.narrowed({"slice_thickness_mm": [0.3, 3.0]})
    with pytest.raises(ValueError, match="would widen"):
        use.narrowed({"max_tilt_deg": 30})
    with pytest.raises(ValueError, match="unknown intended-use limit"):
        use.narrowed({"slice_thickness": [0.3, 1.0]})


def test_shipped_packages_carry_their_intended_use_and_widening_fails_at_load():
    p = pipeline.default_pipeline()
    assert p.stage1_use is not None and p.stage2_use is not None
    assert p.stage2_use.in_plane_spacing_mm[1] <= 1.0 and p.stage2_use.max_tilt_deg <= 5
    assert from_package(p.cls.meta, "stage2") == p.stage2_use
    with pytest.raises(ModelLoadError, match=r"stage2 intended use.*would widen"):
        pipeline.Pipeline(
            p.seg, p.cls, pipeline.GateConfig(stage2={"slice_spacing_mm": [0.3, 5.0]})
        )


def _truth(seed: int, **spec) -> tuple[CTVolume, np.ndarray]:
    study = generate_study(seed, StudySpec.small(field_of_view="full", **STAGE2_READY, **spec))
    return study.volume, np.where(study.labels <= 7, study.labels, 0).astype(np.uint8)


def test_synthetic_truth_is_plausible():
    for seed in (3, 4, 5):
        vol, truth = _truth(seed)
        result = plausibility.check(vol, truth)
        assert result.findings == [], (seed, [f.message for f in result.findings])
        assert list(result.stats) == list(VERTEBRAE)


def test_a_missing_level_between_found_ones_rejects_the_study():
    vol, truth = _truth(3)
    truth[truth == 4] = 0
    result = plausibility.check(vol, truth)
    assert result.study is not None and result.study.check == "consecutive_levels"
    assert result.study.message == "C4 not found between C1 and C7"


def test_swapped_levels_break_the_order():
    vol, truth = _truth(3)
    swapped = truth.copy()
    swapped[truth == 3], swapped[truth == 4] = 4, 3
    result = plausibility.check(vol, swapped)
    assert result.study is not None and result.study.check == "craniocaudal_order"


def test_a_lumbar_like_step_breaks_the_centroid_spacing():
    vol, truth = _truth(4)
    # C4 copied (labels and HU) 40 mm below itself as "C5"; C5..C7 dropped
    step = round(40.0 / abs(vol.affine[2, 0]))
    down = 1 if vol.affine[2, 0] < 0 else -1  # the slice index that goes inferior
    moved = np.where(truth >= 5, 0, truth).astype(np.uint8)
    hu = vol.hu.copy()
    ks, js, is_ = np.nonzero(truth == 4)
    k2 = ks + down * step
    assert k2.min() >= 0 and k2.max() < truth.shape[0]
    moved[k2, js, is_] = 5
    hu[k2, js, is_] = vol.hu[ks, js, is_]
    result = plausibility.check(dataclasses.replace(vol, hu=hu), moved)
    assert result.study is not None and result.study.check == "centroid_spacing"
    assert re.fullmatch(r"C4-C5 centroids 4[0-2] mm apart, expected 9-32 mm", result.study.message)


def test_soft_tissue_blob_and_oversized_label_are_removed():
    vol, truth = _truth(5)
    blob = truth.copy()
    blob[truth == 7] = 0
    ks, js, is_ = np.nonzero(truth == 6)
    # C7 as a blob of soft tissue 25 mm anterior of C6, same size
    shift = round(25.0 / abs(vol.affine[1, 1]))
    js2 = np.clip(js - shift, 0, truth.shape[1] - 1)
    soft = vol.hu.copy()
    soft[ks, js2, is_] = 40
    blob[ks, js2, is_] = 7
    result = plausibility.check(dataclasses.replace(vol, hu=soft), blob)
    assert "C7" in result.rejected and result.rejected["C7"].check in (
        "bone_density",
        "spinal_canal",
    )
    big = truth.copy()
    big[(truth == 0) & (vol.hu > -200) & (np.indices(truth.shape)[0] % 2 == 0)] = 3
    result = plausibility.check(vol, big)
    assert result.rejected["C3"].check == "vertebra_size"


def test_pipeline_removes_a_rejected_vertebra_and_never_labels_it():
    vol, truth = _truth(5)
    lab = truth.copy()
    soft = vol.hu.copy()
    soft[lab == 7] = 30  # C7's mask over soft tissue only: implausible

    class _Seg:
        identity = pipeline.default_pipeline().seg.identity

        def predict(self, v):
            class _Out:
                label_map = lab

            return _Out()

    p = pipeline.Pipeline(_Seg(), pipeline.default_pipeline().cls)
    result = p.run(dataclasses.replace(vol, hu=soft))
    assert result.not_processed is None
    c7 = result.vertebrae[6]
    assert (c7.assessed, c7.reason_code, c7.visible) == (False, "implausible", True)
    assert c7.reason.startswith("segmentation implausible (C7 mean")
    assert not np.any(result.label_map == 7)
    assert all(v.assessed for v in result.vertebrae[:6])


def test_stage2_outside_intended_use_keeps_stage1_and_says_why():
    study = generate_study(2, StudySpec.small(field_of_view="full"))  # 1.25-1.8 mm pixels
    result = pipeline.run(study.volume)
    assert result.not_processed is None
    assert result.label_map.any()  # the SEG is still delivered
    assert result.patient_probability is None
    stage2 = [f for f in result.findings if f.stage == "stage2"]
    assert stage2 and stage2[0].check == "in_plane_spacing"
    for v in result.vertebrae:
        assert not v.assessed and v.probability is None
        if np.any(result.label_map == VERTEBRAE.index(v.label) + 1):
            assert v.reason_code == "outside_intended_use"
            assert v.reason.startswith("input outside intended use (in-plane pixel spacing")


def test_shipped_stage2_refuses_soft_kernels_and_accepts_the_training_ones():
    use = pipeline.default_pipeline().stage2_use
    assert use is not None
    for kernel in ("STD+", "STANDARD", "B30f", "Br36", "FC17", "SOFT"):
        checks = [f.check for f in use.check(_volume(convolution_kernel=kernel))]
        assert checks == ["kernel"], kernel
    for kernel in ("BONE", "B70s", "YC", "FC30", None):  # the synthetic training kernels
        assert use.check(_volume(convolution_kernel=kernel)) == [], kernel
