"""ai.pipeline: both stages on synthetic studies, with the shipped demo models."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from ai import pipeline
from ai.errors import InferenceError
from ai.synthetic import StudySpec, generate_study
from ai.types import VERTEBRAE, ModelIdentity
from tests.helpers import STAGE2_READY


@dataclass
class _Seg:
    """Stage-1 stand-in returning a fixed label map."""

    label_map: np.ndarray

    @property
    def identity(self) -> ModelIdentity:
        return ModelIdentity("stub-seg", "0", "0" * 64, "stub")

    def predict(self, vol: object) -> object:
        lm = self.label_map

        class _Out:
            label_map = lm

        return _Out()


def test_default_run_uses_both_shipped_models_and_is_consistent() -> None:
    study = generate_study(11, StudySpec.small(fracture_rate=1.0, **STAGE2_READY))
    result = pipeline.run(study.volume)
    assert result.label_map.shape == study.volume.hu.shape
    assert result.label_map.dtype == np.uint8
    assert [v.label for v in result.vertebrae] == list(VERTEBRAE)
    for v in result.vertebrae:
        present = bool(np.any(result.label_map == VERTEBRAE.index(v.label) + 1))
        # the demo stage 1 finds every vertebra that is in the field of view
        assert v.assessed == study.visible[v.label], (v, study.visible)
        if v.assessed:
            assert present and v.probability is not None and 0.0 <= v.probability <= 1.0
        else:
            assert v.probability is None and v.reason
    if any(v.assessed for v in result.vertebrae):
        assert result.patient_probability is not None
        assert 0.0 <= result.patient_probability <= 1.0
    else:
        assert result.patient_probability is None
    assert [m.name for m in result.models] == ["seg-demo", "cls-demo"]
    assert all(m.demo for m in result.models)
    assert result.findings == [] and result.not_processed is None
    assert set(result.timings) == {"gate", "stage1", "stage2"}
    assert all(t > 0 for t in result.timings.values())
    assert pipeline.default_pipeline() is pipeline.default_pipeline()  # loaded once


def test_visible_vertebrae_get_probabilities_and_missing_ones_do_not() -> None:
    study = generate_study(
        11, StudySpec.small(field_of_view="c1_c5", fracture_rate=1.0, **STAGE2_READY)
    )
    truth = np.where(study.labels <= 7, study.labels, 0).astype(np.uint8)
    p = pipeline.Pipeline(_Seg(truth), pipeline.default_pipeline().cls)
    result = p.run(study.volume)
    for v in result.vertebrae:
        if study.visible[v.label]:
            assert v.assessed and 0.0 <= v.probability <= 1.0, v
        if not np.any(truth == VERTEBRAE.index(v.label) + 1):
            assert not v.assessed and v.probability is None
            assert v.reason == "not in the field of view"
    assert not result.vertebrae[6].assessed  # C7 lies outside a C1..C5 field of view
    assert result.patient_probability is not None
    assert 0.0 <= result.patient_probability <= 1.0
    assert [m.name for m in result.models] == ["stub-seg", "cls-demo"]


def test_stage1_output_that_does_not_fit_the_volume_is_refused() -> None:
    study = generate_study(2, StudySpec.small())
    p = pipeline.Pipeline(_Seg(np.zeros((3, 3, 3), np.uint8)), pipeline.default_pipeline().cls)
    with pytest.raises(InferenceError, match="does not match"):
        p.run(study.volume)


def test_nothing_segmented_is_not_processed_no_cervical_spine() -> None:
    study = generate_study(2, StudySpec.small(**STAGE2_READY))
    p = pipeline.Pipeline(
        _Seg(np.zeros(study.volume.hu.shape, np.uint8)), pipeline.default_pipeline().cls
    )
    result = p.run(study.volume)
    assert result.patient_probability is None
    assert result.not_processed == "no cervical spine found"
    assert all(not v.assessed and v.probability is None for v in result.vertebrae)
    assert all(v.reason_code == "no_cervical_spine" for v in result.vertebrae)
