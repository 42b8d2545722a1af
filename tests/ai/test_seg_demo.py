"""The shipped stage-1 demo model on held-out synthetic studies, scored on the source grid.

The studies use seeds never used for training (training used 1..90, held-out evaluation
50001..50020). Head-first and feet-first scans store the volume in mirrored orders, so a
flip or axis error anywhere between the loader, the working grid and the way back shows
here as a collapsed Dice or as vertebrae in the wrong order.
"""

from __future__ import annotations

import numpy as np
import pytest

from ai.seg import SegModel
from ai.seg.train import dice_per_label
from ai.synthetic import StudySpec, generate_study
from ai.types import VERTEBRAE

DEMO_MEAN_DICE_FLOOR = 0.90
"""The stage-1 Dice target, asserted on one small study (the shipped weights, with their bone
refinement, score about 0.96 on these two; held-out mean over 20 full-size studies: 0.909)."""


@pytest.fixture(scope="module")
def model() -> SegModel:
    return SegModel.load("seg-demo", device="cpu")


@pytest.mark.parametrize(("seed", "position"), [(70001, "HFS"), (70002, "FFS")])
def test_demo_mask_on_the_source_grid_overlaps_the_truth(model, seed, position) -> None:
    study = generate_study(seed, StudySpec.small(patient_position=position, field_of_view="full"))
    out = model.predict(study.volume)
    assert out.label_map.shape == study.volume.hu.shape
    truth = np.where(study.labels <= 7, study.labels, 0)
    dice = dice_per_label(out.label_map, truth)
    visible = [n for n in VERTEBRAE if study.visible[n]]
    assert len(visible) == 7
    assert min(dice[n] for n in visible) > 0.85, dice
    assert float(np.mean([dice[n] for n in visible])) > DEMO_MEAN_DICE_FLOOR, dice
    # C1 lies above C7 along the patient's head-foot axis (+z in LPS)
    z = {}
    for i, name in enumerate(VERTEBRAE, start=1):
        centre = np.append(np.argwhere(out.label_map == i).mean(axis=0), 1.0)  # (k, j, i, 1)
        z[name] = float((study.volume.affine @ centre)[2])
    assert [z[n] for n in VERTEBRAE] == sorted(z.values(), reverse=True), z
